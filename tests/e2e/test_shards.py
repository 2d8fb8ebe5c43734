"""Packed data sets as a user meets them: `barlow data pack` (a corrupt image left out, a pack killed half-way and
resumed), and `barlow train` over a folder with a corrupt image (data.on_error) or over shards on S3 (the same run as
over the folder). What packing writes and what the readers read, in process: tests/integration/test_shards.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from service.cli.main import main
from service.data.datasets import ImageFolder
from service.data.pack import PARTS
from service.data.shard_reader import ShardedImages, read_index
from service.data.shards import INDEX
from service.errors import DataError
from service.spec import StorageSpec
from service.storage.filesystem import filesystem
from tests.support.image_data import corrupt, damaged_copy, download, write_digit_folder
from tests.support.runs import S3_ENV, overrides, run_barlow, start_barlow
from tests.support.s3_server import TEST_CREDENTIALS

# The training runs here: the folder's 120 images at 8 px in batches of 30 (4 steps an epoch), 2 epochs.
RECIPE = """data: {{dataset: imagefolder, path: {path}, image_size: 8, workers: {workers}}}
augment: {{blur: [0.0, 0.0]}}
model: {{backbone: resnet18, stem: cifar, projector: 64-64}}
optim: {{epochs: 2, batch_size: 30, warmup_epochs: 1}}
run: {{precision: fp32, log_every: 1}}
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_digit_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def packed_s3(folder, s3_server):
    """The folder packed onto moto S3 by `barlow data pack` in shards of 20 kB, once for the module: (url, storage)."""
    s3_server.create_bucket("packed-by-the-cli")
    url = "s3://packed-by-the-cli/digits"
    result = run_barlow("data", "pack", str(folder), url, "--shard-mb", "0.02", "--endpoint-url",
                        s3_server.endpoint_url, env=S3_ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    return url, StorageSpec(endpoint_url=s3_server.endpoint_url)


@pytest.fixture
def credentials(monkeypatch):
    """The test credentials in this process's environment, for reading `packed_s3` here."""
    for key, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(key, value)


def test_a_corrupt_image_is_listed_and_left_out(folder, tmp_path):
    """A flat folder of class folders (one split, so one packing process) with one image cut short."""
    damaged = tmp_path / "damaged"
    shutil.copytree(folder / "train", damaged)
    bad = sorted((damaged / "digit3").iterdir())[1]
    corrupt(bad)
    result = run_barlow("data", "pack", str(damaged), str(tmp_path / "packed"), "--shard-mb", "1", "--processes", "1",
                        timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"left out digit3/{bad.name}" in result.stdout and "1 left out" in result.stdout
    index = read_index(str(tmp_path / "packed" / "train"), StorageSpec())
    names = index.all_names()
    expected = [os.path.relpath(p, folder / "train") for p, _ in ImageFolder(str(folder), "train").samples]
    assert names == [n for n in expected if n != f"digit3/{bad.name}"]
    assert [item["name"] for item in index.meta["left_out"]] == [f"digit3/{bad.name}"]


def test_a_pack_killed_half_way_resumes_and_ends_as_an_uninterrupted_pack(folder, packed_s3, credentials, tmp_path,
                                                                         capsys):
    """The uninterrupted pack is the module's: the same folder in shards of the same size, packed onto S3 (a pack's
    bytes depend on neither its destination nor its number of processes)."""
    url, storage = packed_s3
    fs, path = filesystem(url, storage)
    whole = download(fs, path, tmp_path / "whole")
    resumed = tmp_path / "resumed"
    args = ["data", "pack", str(folder), str(resumed), "--shard-mb", "0.02", "--processes", "1"]
    process = start_barlow(*args)
    parts = resumed / "train" / PARTS
    deadline = time.monotonic() + 120
    while not (parts.exists() and len(list(parts.glob("*.json"))) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the packer and its process pool
    process.wait()
    assert not (resumed / "train" / INDEX).exists()  # nothing committed: training refuses it
    assert main(["data", "ls", str(resumed)]) == 0
    assert "train: packing did not finish" in capsys.readouterr().out
    with pytest.raises(DataError, match="no index.npz"):
        ShardedImages(str(resumed / "train"), StorageSpec())
    done = len(list(parts.glob("*.json")))  # committed parts (a part being written has another name)
    result = run_barlow(*args, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"({done} from an earlier pack)" in result.stdout.splitlines()[0]
    for split in ("train", "val"):
        assert (resumed / split / INDEX).read_bytes() == (whole / split / INDEX).read_bytes()
        index = read_index(str(whole / split), StorageSpec())
        for key in index.shards:
            assert (resumed / split / key).read_bytes() == (whole / split / key).read_bytes(), key
    # the index, the commit, is written after every shard; the parts are gone with the commit
    shards = [resumed / "train" / key for key in read_index(str(resumed / "train"), StorageSpec()).shards]
    assert (resumed / "train" / INDEX).stat().st_mtime_ns >= max(s.stat().st_mtime_ns for s in shards)
    assert not parts.exists()


@pytest.fixture
def damaged_spec(folder, tmp_path):
    """A spec of the training recipe over a copy of the folder whose training image 30 is cut short."""
    (bad,) = damaged_copy(folder, tmp_path / "damaged", 30)
    spec = tmp_path / "spec.yaml"
    spec.write_text(RECIPE.format(path=tmp_path / "damaged", workers=0))
    return spec, bad


def stats(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "stats.txt").read_text().splitlines() if line.startswith("{")]


def test_a_run_that_skips_a_corrupt_image_completes_and_counts_it(damaged_spec, tmp_path):
    """Two epochs: the corrupt image, drawn in both, counts once."""
    spec, bad = damaged_spec
    result = run_barlow("train", str(spec), *overrides(f"run.output={tmp_path / 'skip'}", "data.on_error=skip"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("data.on_error=skip: another sample trains in place of") == 1, result.stderr[-3000:]
    assert f"{bad.parent.name}/{bad.name}" in result.stderr  # named, with the reason
    counts = [line["skipped"] for line in stats(tmp_path / "skip") if "loss" in line and "event" not in line]
    assert len(counts) == 8 and counts[-1] == 1 and counts == sorted(counts)  # one distinct sample, over both epochs


def test_fail_names_the_file_and_a_rerun_fails_the_same_way(damaged_spec, tmp_path):
    """The error is met in a loading process (data.workers=1) and must arrive whole; in the training process the
    same error is raised the same way (tests/unit/data/test_loader.py)."""
    spec, bad = damaged_spec
    for attempt in range(2):
        result = run_barlow("train", str(spec), *overrides(f"run.output={tmp_path / 'fail'}", "data.workers=1"))
        assert result.returncode == 2, result.stderr[-3000:]
        assert bad.name in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.stderr.strip().splitlines()[-1].startswith("barlow: cannot decode image "), result.stderr


def test_training_from_shards_on_s3_equals_training_from_the_folder(folder, packed_s3, tmp_path):
    """Loading processes (data.workers=1) read the shards from S3 over two epochs, with the kNN monitor after each."""
    url, storage = packed_s3
    spec = tmp_path / "spec.yaml"
    spec.write_text(RECIPE.format(path=folder, workers=1) + "monitor: {knn_every_epochs: 1, knn_k: 20}\n")
    losses = {}
    for name, data in (("folder", []),
                       ("shards", ["data.dataset=shards", f"data.path={url}",
                                   f"storage.endpoint_url={storage.endpoint_url}"])):
        output = tmp_path / name
        result = run_barlow("train", str(spec), *overrides(f"run.output={output}", *data), env=S3_ENV)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[name] = [(line.get("loss"), line.get("knn_top1")) for line in stats(output) if "event" not in line]
    assert len(losses["folder"]) == 2 * 4 + 2 and losses["shards"] == losses["folder"]
