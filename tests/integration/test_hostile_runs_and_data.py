"""Hostile storage, the run-files and data-set half of issue 29: what a writer of a run prefix or of a data set's
bucket can plant, and what `barlow status`, `runs ls`, `report`, `data ls` and training with `data.cache` do with it.

Each test plants one artifact into a copy of ONE run folder, written once for the module by the project's own
writers (TrainingStats, EventFiles, the resolved spec: what a run leaves, without the seconds of training it), or of
ONE data set packed once by `barlow data pack`, and types the command through the CLI's entry point in this process
(tests/support/commands.py). A command that cannot go on exits 2 with one `barlow: ...` line naming the object and
what is wrong; one that can (a line of stats.txt skipped, a spec it only takes a number from) goes on and says so in
one line; no traceback; and no file appears where a traversal would put it. Each test failed against the code before
the change (a traceback, an out-of-memory-sized read, or the artifact used as it was): the commit says which.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from service.data.shards import INDEX, ShardIndex
from service.observe.stats import TrainingStats
from service.observe.tensorboard import EventFiles
from service.spec import StorageSpec, load_spec, spec_to_yaml
from tests.support.commands import Result, barlow
from tests.support.runs import DIGITS, TINY, overrides
from tests.support.user_errors import write_image_folder

GiB, MiB = 1 << 30, 1 << 20
STEPS = 8


def one_line(result: Result, code: int, *words: str) -> str:
    """Exit `code`, no traceback, and exactly one line on standard error, holding every one of `words`."""
    output = result.stdout + result.stderr
    assert result.returncode == code and "Traceback" not in output, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and all(word in lines[0] for word in words), output
    return lines[0]


def refused(result: Result, *words: str) -> str:
    line = one_line(result, 2, *words)
    assert line.startswith("barlow: "), line
    return line


# --- the run --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished run of 8 steps as the trainer's writers leave it: stats.txt (a start, every step logged, a kNN
    line, a checkpoint, the end), an event file with scalars and a cross-correlation image, and spec.yaml."""
    folder = tmp_path_factory.mktemp("run") / "run"
    storage = StorageSpec()
    stats = TrainingStats(str(folder), storage, "barlow train specs/digits.yaml", total_steps=STEPS, enabled=True,
                          events=EventFiles(str(folder), storage, purge_step=None))
    stats.event("start", step=0, epoch=0, total_steps=STEPS, steps_per_epoch=4, world_size=1, global_batch=64,
                resumed_from=None, wall=time.time())
    for step in range(STEPS):
        stats.log(epoch=step // 4, step=step, lr_weights=0.1, lr_biases=0.01, loss=50.0 - step, loss_on_diag=40.0,
                  loss_off_diag=10.0 - step, step_time=0.5, images_per_s=128.0, images_per_s_per_worker=128.0,
                  data_wait=0.1, peak_memory_gib=1.0, embedding_std=0.1)
    stats.correlation(4, np.eye(16))
    stats.record(epoch=1, step=STEPS, knn_top1=40.0)
    stats.event("checkpoint", step=STEPS, epoch=2, url=f"{folder}/checkpoints/step-000000008")
    stats.event("end", step=STEPS, epoch=2)
    stats.close()
    (folder / "spec.yaml").write_text(spec_to_yaml(load_spec(DIGITS, [*TINY, f"run.output={folder}"])))
    return folder


@pytest.fixture
def planted(run, tmp_path) -> Path:
    """A copy of the run, under runs/, to plant into."""
    shutil.copytree(run, tmp_path / "runs" / "hostile")
    return tmp_path / "runs" / "hostile"


def append(path: Path, text: str) -> None:
    with open(path, "a") as file:
        file.write(text)


@pytest.mark.parametrize("line, why", [
    ({"step": "eight", "time": None, "epoch": 0, "lr_weights": 0.1, "loss": 1.0}, "step is 'eight', not a count"),
    ({"event": "preempted", "time": 9}, "no step"),  # the last event: status reads its step
    ('{"a":' * 10_000 + "1" + "}" * 10_000, "nested too deeply"),
], ids=["wrong types", "event without its step", "nested brackets"])
def test_status_skips_a_stats_line_of_another_form_and_says_which(planted, line, why):
    """Before: TypeError, KeyError and RecursionError tracebacks. Now the line is skipped, named, and the status is
    the run's."""
    append(planted / "stats.txt", (line if isinstance(line, str) else json.dumps(line)) + "\n")
    number = len((planted / "stats.txt").read_text().splitlines())
    result = barlow("status", str(planted))
    one_line(result, 0, f"{planted}/stats.txt", "1 line(s) skipped", f"line {number}: {why}")
    assert "state       finished" in result.stdout and f"step        {STEPS}/{STEPS}" in result.stdout


def test_a_stats_txt_with_a_gib_appended_is_refused_unread_and_runs_ls_lists_the_rest(planted, run):
    """Before: the whole GiB read (and every byte held three times) before a word. Now status refuses it by its
    size; runs ls lists the other run and this one as unreadable, exit 1."""
    shutil.copytree(run, planted.parent / "good")
    stats = planted / "stats.txt"
    os.truncate(stats, stats.stat().st_size + GiB)  # sparse: costs no disk
    refused(barlow("status", str(planted)), "stats.txt", f"{stats.stat().st_size:,} bytes", "at most 67,108,864")
    listing = barlow("runs", "ls", str(planted.parent))
    one_line(listing, 1, "stats.txt", "at most 67,108,864")
    rows = {line.split()[0]: line.split()[1] for line in listing.stdout.splitlines()[1:]}
    assert rows == {str(planted.parent / "good"): "finished", str(planted): "unreadable"}, listing.stdout


@pytest.mark.parametrize("case", ["nested brackets", "oversized"])
def test_a_hostile_lease_json_is_one_line(planted, case):
    """Before: a RecursionError traceback; a lease.json of any size read whole. Now: the lease is named unreadable
    in the state's line; one larger than a lease record is refused unread."""
    lease = planted / "lease.json"
    if case == "nested brackets":
        lease.write_text("[" * 60_000)  # within the size a lease may have
        result = barlow("status", str(planted))
        assert result.returncode == 0 and "Traceback" not in result.stdout + result.stderr, result
        assert "state       finished: lease.json is unreadable (" in result.stdout, result.stdout
    else:
        lease.write_text(json.dumps({"job_id": "x" * 100_000}))
        refused(barlow("status", str(planted)), "lease.json", "at most 65,536")


@pytest.mark.parametrize("case", ["nested brackets", "oversized"])
def test_a_hostile_spec_yaml_in_status(planted, case):
    """Before: yaml.safe_load's RecursionError traceback (status reads the lease's timeout from the spec); a
    spec.yaml of any size read whole. Now: the default timeout, said in one line; larger than a spec: refused."""
    spec = planted / "spec.yaml"
    if case == "nested brackets":
        spec.write_text("checkpoint: " + "[" * 5_000)
        result = barlow("status", str(planted))
        one_line(result, 0, f"{planted}/spec.yaml", "nests too deeply", "default")
        assert "state       finished" in result.stdout
    else:
        spec.write_text("#" * (2 * MiB))
        refused(barlow("status", str(planted)), "spec.yaml", "at most 1,048,576")


def test_report_skips_an_unknown_event_and_a_spec_that_is_no_mapping(planted, tmp_path):
    """Before: KeyError (an event kind without a style) and AttributeError (list.get) tracebacks. Now the page is
    written; each object is named once."""
    append(planted / "stats.txt", json.dumps({"event": "pwned", "step": 3, "time": 1}) + "\n")
    (planted / "spec.yaml").write_text("- model\n")
    result = barlow("report", str(planted), "-o", str(tmp_path / "report.html"))
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output and (tmp_path / "report.html").exists(), output
    lines = result.stderr.splitlines()
    assert len(lines) == 2, output
    assert f"{planted}/stats.txt" in lines[0] and "event 'pwned' is none of" in lines[0]
    assert f"{planted}/spec.yaml: not a spec with a model.projector" in lines[1]


def record(data: bytes, length: int | None = None) -> bytes:
    """One TFRecord as TensorBoard frames it: length, its masked CRC32C, the data, the data's masked CRC32C."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    header = struct.pack("<Q", len(data) if length is None else length)
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


@pytest.mark.parametrize("case", ["name", "record length", "not an event", "oversized"])
def test_report_refuses_hostile_event_files(planted, tmp_path, case):
    """Before: a name with a terminal escape used as it came; a record declaring 2**62 bytes a MemoryError; a
    record that is no event a protobuf DecodeError traceback; 256 MiB of event files copied and parsed. Now each is
    refused, naming the file or the folder, and no page is written."""
    folder = planted / "tensorboard"
    (real,) = folder.iterdir()
    if case == "name":
        shutil.copy(real, folder / "events.out.tfevents.2.host\x1b[2J.1.0")
        words = ["events.out.tfevents.2.host\\x1b[2J.1.0", "not a name this project writes"]
    elif case == "record length":
        (folder / "events.out.tfevents.2.host.1.0").write_bytes(record(b"x" * 10, length=2**62))
        words = ["events.out.tfevents.2.host.1.0", f"a record of {2**62:,} bytes"]
    elif case == "not an event":
        (folder / "events.out.tfevents.2.host.1.0").write_bytes(record(b"\xff" * 64))
        words = [f"{planted}/tensorboard", "not an event"]
    else:
        big = folder / "events.out.tfevents.2.host.1.0"
        big.touch()
        os.truncate(big, 256 * MiB)
        words = [f"{planted}/tensorboard", "bytes of event files", "at most 268,435,456"]
    refused(barlow("report", str(planted), "-o", str(tmp_path / "report.html")), *words)
    assert not (tmp_path / "report.html").exists()


# --- the data set ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """Eight 8x8 PNGs of two classes, packed by `barlow data pack` into two shards."""
    root = tmp_path_factory.mktemp("data")
    source, dest = write_image_folder(root / "source"), root / "packed"
    result = barlow("data", "pack", str(source), str(dest), "--shard-mb", "0.004", "--processes", "1")
    assert result.returncode == 0, result
    return dest


@pytest.fixture
def data(packed, tmp_path) -> Path:
    """A copy of the packed data set, to plant into."""
    return Path(shutil.copytree(packed, tmp_path / "data"))


def index_of(data: Path) -> ShardIndex:
    return ShardIndex.from_bytes((data / "train" / INDEX).read_bytes(), "the packed index")


def plant(data: Path, index: ShardIndex) -> Path:
    path = data / "train" / INDEX
    path.write_bytes(index.to_bytes())
    return path


def with_header(index: ShardIndex, **fields) -> bytes:
    """The index's bytes with header fields replaced as they are, whatever their types."""
    header = dict(format="barlow-shards/1", classes=index.classes, shards=index.shards,
                  shard_sizes=index.shard_sizes, **index.meta) | fields
    arrays = {name: getattr(index, name) for name in ("shard", "offset", "size", "label", "crc32", "names",
                                                      "name_ends")}
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["../../elsewhere/x.tar", "/etc/x.tar", "3f/../../x.tar", "3f\\x.tar"])
def test_data_ls_refuses_an_index_whose_shard_name_is_a_path(data, name):
    """Before: listed as it was (and read, and cached, at that path)."""
    index = index_of(data)
    path = plant(data, replace(index, shards=[name, *index.shards[1:]]))
    refused(barlow("data", "ls", str(data)), str(path), repr(name), "not a name this project writes")


@pytest.mark.parametrize("fields, why", [
    ({"classes": [0, 1]}, "classes are not a list of class names"),
    ({"classes": ["a", "b\x1b[2J"]}, "classes are not a list of class names"),
    ({"shard_sizes": ["big", 1]}, "shard_sizes are not a size for each"),
    ({"shards": "3f/train-000000.tar"}, "shards are not a list"),
    ({"left_out": 3}, "left_out is not a list"),
], ids=["classes of ints", "class with an escape", "sizes of strings", "shards a string", "left_out a number"])
def test_data_ls_refuses_an_index_header_of_the_wrong_types(data, fields, why):
    """Before: TypeError tracebacks (joining ints, summing strings, len of a number) or a listing of garbage."""
    (data / "train" / INDEX).write_bytes(with_header(index_of(data), **fields))
    refused(barlow("data", "ls", str(data)), f"{data}/train/{INDEX}", why)


@pytest.mark.parametrize("column, why", [
    ("shard", "a sample in a shard the index does not list"),
    ("offset", "a sample's bytes beyond the end of its shard"),
    ("label", "a label outside its classes"),
    ("name_ends", "sample names that do not match their ends"),
])
def test_data_ls_refuses_an_index_whose_columns_disagree(data, column, why):
    """Before: listed; training then read past shards or indexed outside its classes."""
    index = index_of(data)
    wrong = getattr(index, column).copy()
    wrong[-1] = {"shard": 7, "offset": 10**9, "label": 2, "name_ends": wrong[-1] - 1}[column]
    path = plant(data, replace(index, **{column: wrong}))
    refused(barlow("data", "ls", str(data)), str(path), why)


def test_data_ls_refuses_a_compressed_member_unread(data):
    """A zip bomb: 64 MiB of names in a member of ~64 KB. Before: inflated and listed. Now refused from its
    declared sizes, before inflating a byte."""
    index = index_of(data)
    arrays = {name: getattr(index, name) for name in ("shard", "offset", "size", "label", "crc32", "name_ends")}
    header = json.loads(bytes(np.load(io.BytesIO(index.to_bytes()))["header"]))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                        names=np.zeros(64 * MiB, dtype=np.uint8), **arrays)
    (data / "train" / INDEX).write_bytes(buffer.getvalue())
    refused(barlow("data", "ls", str(data)), "member", "is compressed", "declared", "not read")


def test_data_ls_refuses_a_member_whose_header_declares_more_than_it_holds(data):
    """An .npy header declaring 2**40 elements in a member of a few bytes. Before: numpy allocated 8 TiB first
    (a MemoryError traceback). Now refused from the header."""
    good, header = (data / "train" / INDEX).read_bytes(), io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<u8", "fortran_order": False, "shape": (2**40,)})
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            body = source.read(info)
            if info.filename == "offset.npy":
                body = header.getvalue() + index_of(data).offset.tobytes()
            target.writestr(info.filename, body)
    (data / "train" / INDEX).write_bytes(out.getvalue())
    refused(barlow("data", "ls", str(data)), "member offset.npy", "(1099511627776,)", "not what this project writes")


def test_data_ls_refuses_an_index_over_its_limit_unread(data):
    """Before: all 2 GiB read, then 'not a zip'. Now refused by its size."""
    path = data / "train" / INDEX
    os.truncate(path, 2 * GiB + 1)  # sparse
    refused(barlow("data", "ls", str(data)), str(path), "2,147,483,649 bytes", "at most 2,147,483,648", "not read")


def training_from(data_url: str, cache: Path, output: Path, *storage: str) -> list[str]:
    """`barlow train` of the tiny recipe from the packed data set, one batch of its 8 images, shards cached."""
    return ["train", DIGITS, *overrides(*TINY, "optim.batch_size=8", "data.dataset=shards", f"data.path={data_url}",
                                        f"data.cache={cache}", "data.workers=0", f"run.output={output}", *storage)]


def test_training_with_a_cache_refuses_a_traversing_shard_name_before_reading_or_writing(data, tmp_path):
    """The index names `../../elsewhere/x.tar`: the remote object DEST/train/../../elsewhere/x.tar (planted: a real
    shard) and the cached file CACHE/<digest>/../../elsewhere/x.tar. Before: training read it and the cache wrote
    outside its folder. Now training stops with one line before reading or writing anything."""
    index = index_of(data)
    name = "../../elsewhere/x.tar"
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(data / "train" / index.shards[0], tmp_path / "elsewhere" / "x.tar")
    path = plant(data, replace(index, shards=[name, *index.shards[1:]]))
    cache = tmp_path / "node" / "cache"
    result = barlow(*training_from(str(data), cache, tmp_path / "out"))
    refused(result, str(path), repr(name))
    assert not (tmp_path / "node" / "elsewhere").exists() and not cache.exists()
    assert not (tmp_path / "out").exists()


def test_training_from_s3_refuses_an_absolute_shard_name(data, tmp_path, s3_bucket, s3_server):
    """The same from S3, with an absolute name: `Path(cache) / "/abs/x.tar"` is `/abs/x.tar`, where the filler
    downloads the object. Before: training accepted the index and went on to read its shards (stopping here on
    the missing object, which a writer would have planted). Now: one line naming the index, no cache, nothing at
    the path."""
    from service.storage.filesystem import filesystem

    marker = tmp_path / "abs" / "x.tar"
    index = index_of(data)
    plant(data, replace(index, shards=[str(marker), *index.shards[1:]]))
    fs, root = filesystem(f"{s3_bucket}/data", StorageSpec(endpoint_url=s3_server.endpoint_url))
    for file in data.rglob("*"):
        if file.is_file():
            fs.put_file(str(file), f"{root}/{file.relative_to(data)}")
    cache = tmp_path / "cache"
    result = barlow(*training_from(f"{s3_bucket}/data", cache, tmp_path / "out",
                                   f"storage.endpoint_url={s3_server.endpoint_url}"))
    refused(result, f"{s3_bucket}/data/train/{INDEX}", repr(str(marker)))
    assert not marker.parent.exists() and not cache.exists()
