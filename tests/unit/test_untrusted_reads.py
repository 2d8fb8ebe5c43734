"""The pure checks behind the hostile-storage suite (tests/integration/test_hostile_runs_and_data.py): stats.txt's
lines streamed and typed, an event file's record framing, a packed index's byte ranges, and a job's shipped spec.
Every line a run of this project writes passes; each other form is named."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from service.data.pack import _is_part
from service.data.shards import ShardIndex, shard_key
from service.errors import JobError, SpecError
from service.launch.job_spec import SPEC_ENV
from service.launch.scheduler import BarlowKubernetesScheduler
from service.reports.report import MAX_RECORD_BYTES, check_records
from service.reports.run_log import line_problem, parse_lines
from service.storage.untrusted import UntrustedObject, split_lines

START = {"event": "start", "step": 0, "epoch": 0, "total_steps": 16, "steps_per_epoch": 16, "world_size": 1,
         "global_batch": 64, "resumed_from": None, "wall": 1796529514.150973, "time": 0}
STEP = {"epoch": 0, "step": 1, "lr_weights": 0.003125, "lr_biases": 7.5e-05, "loss": 46.07961654663086, "time": 4,
        "loss_on_diag": 45.46, "loss_off_diag": 0.61, "step_time": 2.22, "images_per_s": 28.7,
        "images_per_s_per_worker": 28.7, "data_wait": 0.0027, "peak_memory_gib": 1.02, "embedding_std": 0.087}


def test_lines_are_split_across_chunks_and_a_line_too_long_is_none_whatever_the_chunks():
    chunks = [b"ab\ncd", b"ef\n", b"x" * 10, b"y\nz"]
    assert list(split_lines(chunks, 5)) == [b"ab", b"cdef", None, b"z"]
    assert list(split_lines([b"abcde\n", b"abcdef\n\n"], 5)) == [b"abcde", None, b""]
    assert list(split_lines([b"abc", b"def"], 5)) == [None]  # no newline at all: dropped as it arrives


@pytest.mark.parametrize("line", [
    START, STEP, {"epoch": 0, "step": 16, "knn_top1": 43.8, "time": 30},
    {"event": "checkpoint", "step": 4, "epoch": 0, "url": "/r/checkpoints/step-000000004", "time": 9},
    {"event": "diverged", "step": 6, "epoch": 0, "time": 9}, {**STEP, "loss": float("nan"), "peak_memory_gib": None},
    {"epoch": 0, "step": 2, "resumed_with_changes": ["optim.lr_weights"], "time": 3},
    {"mode": "knn", "k": 200, "acc1": 90.5, "acc5": 99.0, "time": 1},
], ids=["start", "step", "knn", "checkpoint", "diverged", "nan loss", "resume with changes", "evaluation"])
def test_every_line_a_run_writes_passes(line):
    assert line_problem(json.loads(json.dumps(line))) is None


@pytest.mark.parametrize("line, why", [
    ([1], "not a JSON object"),
    ({**STEP, "step": "eight"}, "step is 'eight', not a count"),
    ({**STEP, "step": True}, "step is True, not a count"),
    ({**STEP, "epoch": -1}, "epoch is -1, not a count"),
    ({**START, "total_steps": 10**400}, "total_steps is 1000000000"),
    ({**STEP, "time": None}, "time is None, not a time in seconds"),
    ({**STEP, "step_time": float("inf")}, "step_time is inf, not a time in seconds"),
    ({**START, "wall": 1e300}, "wall is 1e+300, not a time in seconds"),
    ({**STEP, "loss": "low"}, "loss is 'low', not a number"),
    ({**STEP, "images_per_s": 10**400}, "images_per_s is 1000000000"),
    ({"event": "pwned", "step": 1}, "event 'pwned' is none of start, checkpoint"),
    ({"event": "start", "step": 0}, "no total_steps"),
    ({"event": "end"}, "no step"),
    ({"step": 3, "knn_top1": None}, "no knn_top1"),
    ({**STEP, "loss": None}, "no loss"),
])
def test_each_other_form_is_named(line, why):
    assert line_problem(line).startswith(why)


def test_a_skipped_line_hides_nothing_a_resume_superseded():
    """A resume at step 1 supersedes attempt 1's step 1; the bad lines between are skipped and listed."""
    lines = [json.dumps(line).encode() for line in (START, {**STEP, "step": 0}, STEP)]
    lines += [b"barlow train x", json.dumps({**STEP, "step": "x"}).encode(), None, b'{"cut short',
              json.dumps({**START, "step": 1, "wall": START["wall"] + 60}).encode(), json.dumps(STEP).encode()]
    log = parse_lines(lines)
    assert [(line["step"], line["_start"]) for line in log.steps] == [(0, START["wall"]), (1, START["wall"] + 60)]
    assert log.skipped == ["line 5: step is 'x', not a count", "line 6: longer than 65,536 bytes"]


def event_record(length: int, data: bytes = b"") -> bytes:
    return struct.pack("<Q", length) + b"\0" * 4 + data + b"\0" * 4


def test_an_event_file_declaring_a_record_larger_than_an_event_is_refused_and_a_cut_tail_is_not(tmp_path):
    path = tmp_path / "events.out.tfevents.1.h.1.0"
    path.write_bytes(event_record(3, b"abc") + event_record(100, b"cut sho"))  # a file still being written
    check_records(path, "the file")
    path.write_bytes(event_record(3, b"abc") + event_record(MAX_RECORD_BYTES + 1))
    with pytest.raises(UntrustedObject, match=f"the file: a record of {MAX_RECORD_BYTES + 1:,} bytes at byte 19"):
        check_records(path, "the file")


def index(**changes) -> ShardIndex:
    samples = [dict(shard=0, offset=512, size=10, label=1, crc32=5, name="b/x.png"),
               dict(shard=1, offset=512, size=10, label=0, crc32=6, name="a/y.png")]
    built = ShardIndex.build(["a", "b"], ["3f/train-000000.tar", "07/train-000001.tar"], [1024, 1024], samples,
                             meta=dict(source="s", plan="p", left_out=[]))
    for name, value in changes.items():
        setattr(built, name, value)
    return built


def test_an_index_round_trips_and_a_byte_range_that_wraps_around_is_refused():
    read = ShardIndex.from_bytes(index().to_bytes(), "i")
    assert read.all_names() == ["b/x.png", "a/y.png"] and read.shards[1] == "07/train-000001.tar"
    assert len(ShardIndex.from_bytes(ShardIndex.build(["a"], [], [], [], dict(left_out=[])).to_bytes(), "i")) == 0
    wrapping = index(offset=np.array([512, 2**64 - 4], dtype=np.uint64))  # offset + size wraps to 6
    with pytest.raises(UntrustedObject, match="i: a sample's bytes beyond the end of its shard"):
        ShardIndex.from_bytes(wrapping.to_bytes(), "i")
    with pytest.raises(UntrustedObject, match="'3f/ab/train-000000.tar' is not a name this project writes"):
        ShardIndex.from_bytes(index(shards=["3f/ab/train-000000.tar", "x.tar"]).to_bytes(), "i")


def test_a_packs_part_naming_another_shard_than_its_own_is_not_resumed_from():
    """A part is packed again unless it names the shard `shard_key` makes for its number: before, a part's key,
    whatever it was, became a shard name in the committed index."""
    part = {"plan": "p", "number": 1, "key": shard_key("train", 1), "size": 10, "samples": [], "left_out": []}
    assert _is_part(part, "train", "p", 2)
    for wrong in ({"key": "../../elsewhere/x.tar"}, {"key": shard_key("train", 0)}, {"number": 2}, {"number": "1"},
                  {"plan": "q"}):
        assert not _is_part({**part, **wrong}, "train", "p", 2), wrong
    assert not _is_part([part], "train", "p", 2)


class Api:
    def __init__(self, spec: str):
        self.job = {"spec": {"tasks": [{"template": {"spec": {"containers": [
            {"env": [{"name": SPEC_ENV, "value": spec}]}]}}}]}}

    def get_namespaced_custom_object(self, **_):
        return self.job


@pytest.mark.parametrize("spec, error, why", [
    ("run: " + "[" * 5_000, SpecError, "nests too deeply"),
    ("- 1\n", JobError, "not a spec with a run.output"),
    ("run: {output: [1]}", JobError, "not a spec with a run.output"),
])
def test_a_jobs_shipped_spec_that_is_no_spec_is_one_error(monkeypatch, spec, error, why):
    """Before: yaml.safe_load's RecursionError, and TypeError or KeyError tracebacks."""
    monkeypatch.setattr(BarlowKubernetesScheduler, "_custom_objects_api", lambda self: Api(spec))
    with pytest.raises(error, match=why):
        BarlowKubernetesScheduler("torchx").run_location("barlow:barlowtwins-x1")
