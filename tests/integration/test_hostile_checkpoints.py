"""Checkpoints planted by a hostile writer (one who can write a run prefix, or hands you a checkpoint URL), through
the commands a user types, in this process: `barlow export`, `barlow train` resuming, `barlow evaluate`,
`barlow checkpoints ls --verify`.

The writer controls a checkpoint's objects and its manifest alike, so each planted object comes with a manifest
entry whose size and CRC32 match it. Every command must refuse in one line, run nothing of what it read (the
payload's marker file must not exist) and read nothing outside the checkpoint; a resume treats the checkpoint as
corrupt and falls back to the previous one. One tiny run is trained once for the module; each test plants into a
copy (its checkpoints hard-linked: planting replaces files, it never writes into one). The readers' parts:
tests/unit/checkpoint/test_dcp_io.py and test_catalog.py.
"""

import io
import json
import os
import pickle
import shutil
import zlib
from pathlib import Path

import pytest
import torch

from service.cli.main import main
from tests.support.runs import train_args

NEWEST, PREVIOUS = "step-000000016", "step-000000012"


class Planted:
    """Unpickling it runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The tiny recipe in this process: 16 steps, checkpoints at steps 12 and 16 kept."""
    output = tmp_path_factory.mktemp("hostile") / "run"
    assert main(train_args(str(output), "checkpoint.keep_last=2", "data.workers=0")) == 0
    assert sorted(os.listdir(output / "checkpoints")) == [PREVIOUS, NEWEST]
    return output


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A copy of the tiny run: checkpoints hard-linked, the files a resume appends to or rewrites copied."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy, copy_function=lambda src, dst: (
        os.link(src, dst) if f"{os.sep}checkpoints{os.sep}" in src else shutil.copy2(src, dst)))
    return copy


def plant(checkpoint: Path, name: str, data: bytes) -> None:
    """Replace one object of a checkpoint, and its manifest entry with the size and CRC32 that match."""
    (checkpoint / name).unlink()
    (checkpoint / name).write_bytes(data)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for entry in manifest["objects"]:
        if entry["name"] == name:
            entry.update(size=len(data), crc32=zlib.crc32(data))
    (checkpoint / "manifest.json").unlink()
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def metadata_of(checkpoint: Path):
    return pickle.loads((checkpoint / ".metadata").read_bytes())  # our own checkpoint, read by the test


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("barlow:")]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0]


@pytest.fixture
def code_in_metadata(run, tmp_path) -> tuple[Path, Path]:
    """The newest checkpoint's `.metadata` replaced by a pickle that runs `touch MARKER`: (run, marker)."""
    marker = tmp_path / "planted"
    plant(run / "checkpoints" / NEWEST, ".metadata", pickle.dumps(Planted(marker)))
    return run, marker


def test_export_refuses_a_checkpoint_whose_metadata_runs_code(code_in_metadata, tmp_path, capfd):
    run, marker = code_in_metadata
    out = tmp_path / "out.pth"
    assert main(["export", str(run / "checkpoints" / NEWEST), str(out)]) == 2
    line = one_line(capfd.readouterr().err)
    assert NEWEST in line and "posix.system" in line and "refused" in line
    assert not marker.exists() and not out.exists()


def test_evaluate_refuses_a_checkpoint_whose_metadata_runs_code(code_in_metadata, tmp_path, capfd):
    run, marker = code_in_metadata
    code = main(["evaluate", "specs/digits-linear.yaml", "--set", f"backbone.weights={run}/checkpoints/{NEWEST}",
                 "--set", f"run.output={tmp_path}/eval", "--set", "data.image_size=8"])
    assert code == 2
    line = one_line(capfd.readouterr().err)
    assert NEWEST in line and "posix.system" in line
    assert not marker.exists()


def test_checkpoints_ls_verify_reports_it_corrupt_without_running_it(code_in_metadata, capfd):
    run, marker = code_in_metadata
    assert main(["checkpoints", "ls", str(run), "--verify"]) == 1
    rows = {line.split()[0]: line for line in capfd.readouterr().out.splitlines()}  # by step
    assert "CORRUPT" in rows["16"] and "posix.system" in rows["16"]
    assert rows["12"].endswith("verified")
    assert not marker.exists()


def test_a_resume_falls_back_past_it_to_the_previous_checkpoint(code_in_metadata, capfd):
    run, marker = code_in_metadata
    assert main(train_args(str(run), "checkpoint.keep_last=2", "data.workers=0")) == 0
    err = capfd.readouterr().err
    assert f"{NEWEST} is corrupt and will not be loaded" in err and "posix.system" in err, err[-3000:]
    assert f"resumed from {run}/checkpoints/{PREVIOUS}: step 12" in err, err[-3000:]
    assert not marker.exists()


def test_a_resume_refuses_an_item_that_runs_code(run, tmp_path, capfd):
    """The metadata is DCP's own, but points an optimizer hyperparameter at a pickle that runs code (appended to
    the data object): DCP itself reads such items with torch.load(weights_only=False). Only a resume reads the
    optimizer; export and evaluate read the model's tensors alone."""
    checkpoint = run / "checkpoints" / NEWEST
    marker = tmp_path / "planted"
    metadata = metadata_of(checkpoint)
    (info,) = [s for i, s in metadata.storage_data.items() if i.fqn == "optimizer.param_groups.0.lr"]
    data = (checkpoint / info.relative_path).read_bytes()
    buffer = io.BytesIO()
    torch.save(Planted(marker), buffer)  # as DCP writes its items (a raw pickle is refused too, by its opcodes)
    payload = buffer.getvalue()
    info.offset, info.length = len(data), len(payload)
    plant(checkpoint, info.relative_path, data + payload)
    plant(checkpoint, ".metadata", pickle.dumps(metadata))
    assert main(train_args(str(run), "checkpoint.keep_last=2", "data.workers=0")) == 0
    err = capfd.readouterr().err
    assert f"{NEWEST} is corrupt and will not be loaded: item optimizer.param_groups.0.lr" in err, err[-3000:]
    assert "posix.system" in err and f"resumed from {run}/checkpoints/{PREVIOUS}: step 12" in err, err[-3000:]
    assert not marker.exists()


def test_metadata_pointing_outside_its_checkpoint_is_refused(run, tmp_path, capfd):
    """DCP reads each item from the object its metadata names: a path to another checkpoint's object would load
    weights the manifest does not describe."""
    checkpoint = run / "checkpoints" / NEWEST
    metadata = metadata_of(checkpoint)
    name = next(iter(metadata.storage_data.values())).relative_path
    for info in metadata.storage_data.values():
        info.relative_path = f"../{PREVIOUS}/{info.relative_path}"
    plant(checkpoint, ".metadata", pickle.dumps(metadata))
    plant(checkpoint, name, (run / "checkpoints" / PREVIOUS / name).read_bytes())  # the sizes the manifest needs
    out = tmp_path / "out.pth"
    assert main(["export", str(checkpoint), str(out)]) == 2
    line = one_line(capfd.readouterr().err)
    assert f"'../{PREVIOUS}/{name}' is not a name this project writes" in line
    assert not out.exists()


@pytest.mark.parametrize("hostile, problem", [
    (lambda text: "[" * 200_000 + "]" * 200_000, "nested too deeply"),
    (lambda text: text.replace('"step": 16', '"step": "sixteen"'), "step: Input should be a valid integer"),
    (lambda text: " " * (17 << 20) + text, "more than a checkpoint manifest holds"),
], ids=["bomb", "wrong-type", "17-MiB"])
def test_a_hostile_manifest_is_one_line_and_a_resume_falls_back(run, hostile, problem, tmp_path, capfd):
    checkpoint = run / "checkpoints" / NEWEST
    text = (checkpoint / "manifest.json").read_text()
    (checkpoint / "manifest.json").unlink()
    (checkpoint / "manifest.json").write_text(hostile(text))
    assert main(["export", str(checkpoint), str(tmp_path / "out.pth")]) == 2
    line = one_line(capfd.readouterr().err)
    assert NEWEST in line and problem in line
    assert main(["checkpoints", "ls", str(run)]) == 0
    assert problem in capfd.readouterr().out
    assert main(train_args(str(run), "checkpoint.keep_last=2", "data.workers=0", "optim.epochs=1")) == 0
    err = capfd.readouterr().err
    assert f"resumed from {run}/checkpoints/{PREVIOUS}: step 12" in err, err[-3000:]


def test_a_checkpoint_of_this_project_is_not_refused(run, tmp_path, capfd):
    """What the restrictions must let through: the run's own checkpoints export and verify."""
    assert main(["checkpoints", "ls", str(run), "--verify"]) == 0
    assert main(["export", str(run / "checkpoints" / NEWEST), str(tmp_path / "out.pth")]) == 0
    assert (tmp_path / "out.pth").stat().st_size > 0


def test_the_payload_runs_when_unpickled_freely(tmp_path):
    """The marker these tests look for is what the payload makes when it runs: its absence means something."""
    marker = tmp_path / "planted"
    pickle.loads(pickle.dumps(Planted(marker)))
    assert marker.exists()

