"""The checkpoint manager against real storage: a moto S3 server, local folders and fsspec's memory store.

A run saved once per store (`saved_s3`, `saved_file`, `saved_memory`: trained two steps, saved as step 5) serves the
tests that only read a checkpoint; a test that saves, damages or deletes checkpoints trains a run of its own. Which
recipe changes a resume refuses, field by field: tests/unit/spec/test_recipe.py.
"""

import io
import json
import logging
import pickle
import re
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest
import torch
from s3fs import S3FileSystem

from service.checkpoint import dcp_io
from service.checkpoint.catalog import inspect_checkpoint, list_checkpoints, verify_checkpoint
from service.cli.main import main
from service.errors import CheckpointError
from service.spec import ModelSpec, StorageSpec
from service.storage.filesystem import filesystem
from tests.support.runs import ROOT
from tests.support.s3_proxy import S3Proxy
from tests.support.s3_server import TEST_CREDENTIALS, S3Server
from tests.support.training import MODEL, Training


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def snapshot(state: dict) -> dict:
    return {key: value.clone() for key, value in state.items()}


STORES = [pytest.param("s3", marks=pytest.mark.s3), "file", "memory"]  # s3: its fixture is asked for by name


@pytest.fixture(params=STORES)
def run_url(request, tmp_path):
    """A new run's URL on each store."""
    if request.param == "s3":
        yield request.getfixturevalue("s3_bucket") + "/runs/test"
    elif request.param == "file":
        yield f"file://{tmp_path}/run"
    else:
        name = f"memory://run-{time.monotonic_ns()}"
        yield name
        fsspec.filesystem("memory").rm(name.removeprefix("memory://"), recursive=True)


def storage_for(url: str, request) -> StorageSpec:
    if url.startswith("s3://"):
        return StorageSpec(endpoint_url=request.getfixturevalue("s3_server").endpoint_url)
    return StorageSpec()


@dataclass(frozen=True)
class SavedRun:
    """A run whose only checkpoint is step 5, the state it holds, and the state one more step (seed 10) leads to."""

    url: str
    storage: StorageSpec
    at_save: dict
    after_next_step: dict


def save_run(url: str, storage: StorageSpec) -> SavedRun:
    training = Training(url, storage)
    training.step(0)
    training.step(1)
    training.manager.save(5, wait=True)
    training.manager.close()
    at_save = snapshot(training.state())
    training.step(10)
    return SavedRun(url, storage, at_save, snapshot(training.state()))


@pytest.fixture(scope="module")
def saved_s3(s3_server):
    with pytest.MonkeyPatch.context() as patch:
        for key, value in TEST_CREDENTIALS.items():
            patch.setenv(key, value)
        S3FileSystem.clear_instance_cache()
        yield save_run(s3_server.create_bucket("saved-run") + "/run",
                       StorageSpec(endpoint_url=s3_server.endpoint_url))


@pytest.fixture(scope="module")
def saved_file(tmp_path_factory):
    return save_run(f"file://{tmp_path_factory.mktemp('saved')}/run", StorageSpec())


@pytest.fixture(scope="module")
def saved_memory():
    name = f"memory://saved-{time.monotonic_ns()}"
    yield save_run(name, StorageSpec())
    fsspec.filesystem("memory").rm(name.removeprefix("memory://"), recursive=True)


@pytest.fixture(params=STORES)
def saved(request):
    """`saved_s3`, `saved_file` and `saved_memory` in turn."""
    return request.getfixturevalue(f"saved_{request.param}")


def test_round_trip_restores_model_momentum_and_step(saved):
    second = Training(saved.url, saved.storage, seed=1)  # another initialisation, replaced by the checkpoint
    assert second.manager.restore() == 5
    assert_same_state(second.state(), saved.at_save)
    second.step(10)  # and training goes on as it went on from the saved state
    assert_same_state(second.state(), saved.after_next_step)
    second.manager.close()


def test_an_fp16_run_resumes_its_gradscaler_state(tmp_path):
    """The scaler's state travels in the manifest, checked against a GradScaler's fields before it is loaded."""
    url = f"file://{tmp_path}/run"
    first = Training(url, fp16=True)
    first.step(0)
    first.scaler.update(new_scale=3.0)
    first.manager.save(4, wait=True)
    first.manager.close()
    second = Training(url, seed=1, fp16=True)
    assert second.manager.restore() == 4
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**10).state_dict()
    assert second.scaler.state_dict() == first.scaler.state_dict() != fresh
    second.manager.close()


def metadata_globals(checkpoint: Path) -> set[tuple[str, str]]:
    """Every global the `.metadata` objects of one of our own checkpoints refer to (read freely: we wrote it)."""
    needed: set[tuple[str, str]] = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            needed.add((module, name))
            return super().find_class(module, name)

    for path in checkpoint.glob("*.metadata"):
        Recording(io.BytesIO(path.read_bytes())).load()
    return needed


def test_the_metadata_allow_list_is_what_real_checkpoints_need(saved_file, tmp_path):
    """The restricted reader admits exactly what DCP's metadata of our checkpoints is made of (torch's dtypes
    aside): a torch that adds a class fails here, naming it, as well as on every load. Training on 1 worker and
    with fp16's scaler here; round trips through the same reader of 2 workers' checkpoints (tests/e2e: the
    resumed tiny run), pre-emption's (tests/e2e/test_resume.py) and evaluation's (test_evaluate.py: a rerun)."""
    fp16 = Training(f"file://{tmp_path}/fp16", fp16=True)
    fp16.step(0)
    fp16.manager.save(4, wait=True)
    fp16.manager.close()
    checkpoints = [Path(saved_file.url.removeprefix("file://")) / "checkpoints" / "step-000000005",
                   tmp_path / "fp16" / "checkpoints" / "step-000000004"]
    needed = set().union(*(metadata_globals(checkpoint) for checkpoint in checkpoints))
    dtypes = {(module, name) for module, name in needed if module == "torch" and name in dcp_io._DTYPES}
    # Python >= 3.12 pickles Enum members so (tests/unit/checkpoint/test_dcp_io.py)
    enum_by_name = {("builtins", "getattr")}
    assert dtypes and needed - dtypes - enum_by_name == dcp_io.METADATA_GLOBALS


def test_manifest_lists_every_object_with_its_size_and_crc32(saved_s3):
    (checkpoint,) = list_checkpoints(saved_s3.url, saved_s3.storage)
    assert checkpoint.valid and checkpoint.step == 5 and checkpoint.url.endswith("/checkpoints/step-000000005")
    manifest = checkpoint.manifest
    assert (manifest["epoch"], manifest["batch_in_epoch"], manifest["world_size"]) == (1, 1, 1)
    assert manifest["spec"]["model"] == MODEL.model_dump(mode="json") and "torch" in manifest["versions"]
    fs, path = filesystem(checkpoint.url, saved_s3.storage)
    stored = {entry["name"].rsplit("/", 1)[-1] for entry in fs.ls(path, detail=True)}
    assert {obj["name"] for obj in manifest["objects"]} == stored - {"manifest.json"}
    assert ".metadata" in stored
    for obj in manifest["objects"]:
        data = fs.cat_file(f"{path}/{obj['name']}")
        assert (len(data), zlib.crc32(data)) == (obj["size"], obj["crc32"])


def test_prefix_without_manifest_is_ignored_reported_and_later_deleted(tmp_path, caplog):
    run = str(tmp_path / "run")
    training = Training(run)
    training.manager.save(4, wait=True)
    training.manager.save(8, wait=True)
    (tmp_path / "run/checkpoints/step-000000008/manifest.json").unlink()  # as if killed before the commit
    checkpoints = list_checkpoints(run, StorageSpec())
    assert [(c.step, c.valid) for c in checkpoints] == [(4, True), (8, False)]
    assert "no manifest" in checkpoints[1].problem

    resumed = Training(run)
    with caplog.at_level(logging.WARNING, logger="barlow"):
        assert resumed.manager.restore() == 4
    assert "ignoring" in caplog.text and "step-000000008" in caplog.text
    resumed.manager.save(12, wait=True)
    assert [c.step for c in list_checkpoints(run, StorageSpec())] == [4, 12]  # partial step 8 cleaned up


def test_object_of_the_wrong_size_invalidates_the_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    Training(run).manager.save(4, wait=True)
    shard = tmp_path / "run/checkpoints/step-000000004/__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    checkpoint = inspect_checkpoint(f"{run}/checkpoints/step-000000004", StorageSpec())
    assert not checkpoint.valid and "__0_0.distcp" in checkpoint.problem


def test_retention_keeps_the_last_k_and_every_mth_epoch(tmp_path):
    run = str(tmp_path / "run")
    training = Training(run, keep_last=2, keep_every_epochs=2)  # 4 steps per epoch
    for step in (4, 8, 10, 16, 18, 20):
        training.manager.save(step)
    training.manager.close()
    # epochs 2 and 4 end at steps 8 and 16; epoch 1's end (4) and step 10 (2 steps past epoch 2's end) go; epoch 5's
    # end (20) stays as one of the last two
    assert [c.step for c in list_checkpoints(run, StorageSpec())] == [8, 16, 18, 20]


def test_resume_url_of_another_model_is_refused(saved_file, tmp_path):
    other = Training(str(tmp_path / "other"), model=ModelSpec(backbone="resnet18", stem="cifar", projector="64-16"),
                     resume=f"{saved_file.url}/checkpoints/step-000000005")
    with pytest.raises(CheckpointError, match=r"another recipe: model.projector: .32-16. -> .64-16."):
        other.manager.restore()
    other.manager.close()


def test_resume_url_that_is_not_a_checkpoint_is_refused(tmp_path):
    training = Training(str(tmp_path / "run"), resume=str(tmp_path / "nowhere/checkpoints/step-000000004"))
    with pytest.raises(CheckpointError, match="does not exist"):
        training.manager.restore()


def test_storage_outage_fails_one_save_and_the_next_succeeds(s3_bucket, s3_server, caplog):
    """The storage the run sees is a proxy in front of the S3 server: stopped, nothing answers on its port (as
    when the endpoint is down); started again on the same port, the storage is back with what it held."""
    with S3Proxy(s3_server.endpoint_url, min_ms=0, max_ms=0) as proxy:
        storage = StorageSpec(endpoint_url=proxy.endpoint_url, retries=1)
        training = Training(f"{s3_bucket}/run", storage)
        training.manager.save(4, wait=True)
        proxy.stop()
        with caplog.at_level(logging.ERROR, logger="barlow"):
            training.manager.save(8, wait=True)  # must not raise: training goes on
        assert training.manager.failed == [8] and "checkpoint at step 8 failed" in caplog.text
        proxy.start()
        training.step(0)
        training.manager.save(12, wait=True)
        assert training.manager.committed == [4, 12]
        assert [(c.step, c.valid) for c in list_checkpoints(f"{s3_bucket}/run", storage)] == [(4, True), (12, True)]
        training.manager.close()


@pytest.mark.parametrize("case", ["missing bucket", "rejected credentials", "no credentials", "unreachable"])
def test_unusable_storage_is_one_clear_error_without_secrets(case, s3_server, aws_env, monkeypatch, capsys):
    endpoint, bucket = s3_server.endpoint_url, s3_server.create_bucket("present")
    expected = {"missing bucket": "does not exist", "rejected credentials": "access denied",
                "no credentials": "no credentials found", "unreachable": "cannot reach the storage endpoint"}[case]
    strict = None
    if case == "missing bucket":
        bucket = "s3://absent"
    elif case == "rejected credentials":
        strict = S3Server(enforce_auth=True).start()
        endpoint = strict.endpoint_url
    elif case == "no credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    else:
        endpoint = "http://127.0.0.1:9"
    try:
        code = main(["train", "specs/digits.yaml", "--set", f"run.output={bucket}/run",
                     "--set", f"storage.endpoint_url={endpoint}"])
    finally:
        if strict:
            strict.stop()
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"barlow: {bucket}/run/checkpoints: ") and expected in err
    assert aws_env["AWS_SECRET_ACCESS_KEY"] not in err


KILLED_SAVE = """
import sys, torch
from service.checkpoint import dcp_io
state = {{"big": torch.randn(64, 1024, 1024)}}  # 256 MiB: several seconds to upload to the test server
dcp_io.save(state, "{url}", {{"endpoint_url": "{endpoint}"}})
"""


@pytest.mark.slow
def test_save_killed_half_way_leaves_the_previous_checkpoint_loadable(s3_bucket, s3_server):
    """The save cut off half-way is another process's, killed while its multipart upload is under way."""
    import boto3

    storage = StorageSpec(endpoint_url=s3_server.endpoint_url)
    run = f"{s3_bucket}/run"
    training = Training(run, storage)
    training.step(0)
    training.manager.save(4, wait=True)
    partial = f"{run}/checkpoints/step-000000008"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_SAVE.format(url=partial, endpoint=s3_server.endpoint_url)],
                              cwd=ROOT)
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    bucket = s3_bucket.removeprefix("s3://")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and writer.poll() is None \
            and not s3.list_multipart_uploads(Bucket=bucket).get("Uploads"):
        time.sleep(0.02)
    time.sleep(0.5)  # a few parts in
    writer.kill()
    writer.wait()
    assert writer.returncode != 0, "the save finished before it could be killed"
    assert s3.list_multipart_uploads(Bucket=bucket)["Uploads"], "expected an upload cut off half-way"

    checkpoints = list_checkpoints(run, storage)
    assert [c.step for c in checkpoints if c.valid] == [4]
    assert all(not c.valid for c in checkpoints if c.step == 8)
    resumed = Training(run, storage, seed=3)
    assert resumed.manager.restore() == 4
    assert_same_state(resumed.state(), training.state())


def test_checkpoints_ls_shows_valid_and_incomplete(tmp_path, capsys):
    run = str(tmp_path / "run")
    training = Training(run)
    training.manager.save(4, wait=True)
    training.manager.save(6, wait=True)
    (tmp_path / "run/checkpoints/step-000000006/manifest.json").unlink()
    assert main(["checkpoints", "ls", run]) == 0
    header, first, second = capsys.readouterr().out.splitlines()
    assert header.split()[:4] == ["STEP", "EPOCH", "BATCH", "SIZE"]
    assert first.split()[:3] == ["4", "1", "0"] and first.endswith("valid")
    assert second.startswith("6") and "INVALID: no manifest" in second


def test_export_from_s3_checkpoint_loads_into_torchvision(saved_s3, tmp_path):
    import torchvision

    out = tmp_path / "backbone.pth"
    assert main(["export", f"{saved_s3.url}/checkpoints/step-000000005", str(out),
                 "--endpoint-url", saved_s3.storage.endpoint_url]) == 0
    resnet = torchvision.models.resnet18()
    resnet.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    missing, unexpected = resnet.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    assert torch.equal(resnet.conv1.weight, saved_s3.at_save["backbone.conv1.weight"])


def test_restore_checks_every_object_and_falls_back_past_a_corrupt_checkpoint(run_url, request, caplog):
    storage = storage_for(run_url, request)
    first = Training(run_url, storage)
    first.step(0)
    first.manager.save(4, wait=True)
    at_four = {key: value.clone() for key, value in first.state().items()}
    first.step(1)
    first.manager.save(8, wait=True)
    first.manager.close()
    fs, path = filesystem(f"{run_url}/checkpoints/step-000000008/__0_0.distcp", storage)
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0x01  # one bit, same size: the listing cannot tell
    fs.pipe_file(path, bytes(data))
    assert inspect_checkpoint(f"{run_url}/checkpoints/step-000000008", storage).valid

    resumed = Training(run_url, storage, seed=1)
    with caplog.at_level(logging.ERROR, logger="barlow"):
        assert resumed.manager.restore() == 4
    assert "step-000000008 is corrupt" in caplog.text and "__0_0.distcp has CRC32" in caplog.text
    assert_same_state(resumed.state(), at_four)
    assert [c.step for c in list_checkpoints(run_url, storage)] == [4]  # this run saves step 8 again
    resumed.manager.close()


def test_a_failed_verification_leaves_the_model_untouched(tmp_path):
    run = str(tmp_path / "run")
    Training(run).manager.save(4, wait=True)
    (tmp_path / "run/checkpoints/step-000000004/.metadata").write_bytes(
        bytes(b ^ 0xFF for b in (tmp_path / "run/checkpoints/step-000000004/.metadata").read_bytes()))
    fresh = Training(run, seed=3)
    before = {key: value.clone() for key, value in fresh.model.state_dict().items()}
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies"):
        fresh.manager.restore()
    assert_same_state(fresh.model.state_dict(), before)
    assert (tmp_path / "run/checkpoints/step-000000004").exists()  # nothing deleted


def test_verify_checkpoint_names_the_corrupt_object(tmp_path):
    run = str(tmp_path / "run")
    Training(run).manager.save(4, wait=True)
    url = f"{run}/checkpoints/step-000000004"
    assert verify_checkpoint(url, StorageSpec()).valid
    metadata = tmp_path / "run/checkpoints/step-000000004/.metadata"
    metadata.write_bytes(metadata.read_bytes()[:-1] + b"\x00")
    problem = verify_checkpoint(url, StorageSpec()).problem
    assert problem.startswith("object .metadata has CRC32") and "the manifest says" in problem


def test_names_that_are_not_checkpoints_are_left_alone(tmp_path):
    run = str(tmp_path / "run")
    training = Training(run)
    training.manager.save(4, wait=True)
    training.manager.close()
    shutil.copytree(tmp_path / "run/checkpoints/step-000000004", tmp_path / "run/checkpoints/step-000000008.bak")
    assert [c.step for c in list_checkpoints(run, StorageSpec())] == [4]
    assert Training(run).manager.restore() == 4
    assert (tmp_path / "run/checkpoints/step-000000008.bak").exists()
    bad = Training(str(tmp_path / "other"), resume=f"{run}/checkpoints/step-000000008.bak")
    with pytest.raises(CheckpointError, match="not a checkpoint: its name is not step-NNNNNNNNN"):
        bad.manager.restore()


def test_non_finite_state_is_never_written(tmp_path, caplog):
    run = str(tmp_path / "run")
    training = Training(run)
    training.manager.save(4, wait=True)
    with torch.no_grad():
        next(training.model.parameters())[0].fill_(float("inf"))
    with caplog.at_level(logging.ERROR, logger="barlow"):
        training.manager.save(8, wait=True)
    assert training.manager.failed == [8] and "holds NaN or infinity" in caplog.text
    assert [c.step for c in list_checkpoints(run, StorageSpec())] == [4]
    assert not training.manager.last_save_committed
    assert training.manager.newest_committed_url().endswith("step-000000004")


def test_manifest_carries_the_run_id_and_a_resume_keeps_it(tmp_path):
    run = str(tmp_path / "run")
    first = Training(run)
    assert first.manager.restore() == 0
    first.manager.save(4, wait=True)
    first.manager.close()
    (checkpoint,) = list_checkpoints(run, StorageSpec())
    assert checkpoint.run_id and checkpoint.manifest["job_id"]
    second = Training(run)
    assert second.manager.restore() == 4
    second.manager.save(8, wait=True)
    second.manager.close()
    assert {c.run_id for c in list_checkpoints(run, StorageSpec())} == {checkpoint.run_id}


def test_auto_resume_refuses_a_checkpoint_of_another_run_than_the_leases(tmp_path):
    run = str(tmp_path / "run")
    first = Training(run)
    first.manager.restore()
    first.manager.save(4, wait=True)
    first.manager.close()
    stale = dict(run_id="someone-else", job_id="dead-job", host="elsewhere", pid=1,
                 started="2026-01-01T00:00:00Z", heartbeat=time.time() - 3600)
    (tmp_path / "run/lease.json").write_text(json.dumps(stale))  # a crashed run of another lineage held it
    taker = Training(run)
    with pytest.raises(CheckpointError, match="was written by run .* belongs to run someone-else"):
        taker.manager.restore()
    taker.manager.close()
    told = Training(str(tmp_path / "branch"), resume=f"{run}/checkpoints/step-000000004")
    assert told.manager.restore() == 4  # named on purpose: a new run branching off it
    assert told.manager.parent == {"run_id": list_checkpoints(run, StorageSpec())[0].run_id,
                                   "checkpoint": f"{run}/checkpoints/step-000000004"}


@pytest.mark.parametrize("change, allowed, refused", [
    ({"optim": {"epochs": 20}}, [], "optim.epochs"),
    ({"optim": {"epochs": 20, "lr_weights": 0.1}}, ["optim"], None),
    ({"run": {"log_every": 7}, "checkpoint": {"every_steps": 3}, "monitor": {"knn_every_epochs": 2}}, [], None),
])
def test_resume_compares_recipes(saved_file, change, allowed, refused):
    """A refused change, changes allowed by name, changes that alter nothing: every field's case is in
    tests/unit/spec/test_recipe.py."""
    second = Training(saved_file.url, allow_changes=allowed)
    spec = second.manager.resolved_spec
    for section, fields in change.items():
        spec[section] = {**spec[section], **fields}
    try:
        if refused:
            with pytest.raises(CheckpointError, match=f"another recipe: {re.escape(refused)}"):
                second.manager.restore()
        else:
            assert second.manager.restore() == 5
    finally:
        second.manager.close()


def test_a_run_whose_lease_was_taken_over_commits_nothing(run_url, request, caplog):
    from service.run.lease import Lease

    storage = storage_for(run_url, request)
    first = Training(run_url, storage)
    first.manager.restore()
    first.manager.save(4, wait=True)
    taker = Lease.acquire(run_url, storage, job_id="another-job", timeout_s=300, force=True)
    with caplog.at_level(logging.ERROR, logger="barlow"):
        first.manager.save(8, wait=True)  # the heartbeat has not run yet: the commit itself must find out
    assert first.manager.failed == [8] and "lease lost" in caplog.text and "another-job" in caplog.text
    assert [(c.step, c.valid) for c in list_checkpoints(run_url, storage)] == [(4, True), (8, False)]
    first.manager.close()
    taker.release()
