"""The runs that several end-to-end tests read, each trained once per test session.

Training dominates what these tests cost, and most of them only read what a run wrote: each run here is made once,
by a session-scoped fixture, and shared. A test never changes a shared run; one that must (corrupt a checkpoint,
resume it with other settings) copies it first. A test that trains a run of its own says why in its docstring.

- `tiny_run`: the tiny recipe on 2 torchrun workers, on the S3 server, with the kNN monitor, TensorBoard and its
  cross-correlation images on and the colour augmentations on the device (`SHARED`): the finished run that the CLI,
  status, runs ls and observe tests read, and the uninterrupted twin of the interrupted runs of test_resume and
  test_torchx_local, which train with the same settings.
- `resumed_run`: a copy of `tiny_run` whose last checkpoint never reached the store (a node lost just before),
  rerun: it resumes from step 12 and trains steps 12-15 again, whose TensorBoard events and image were already
  uploaded (the report and TensorBoard tests read it).
- `local_run`: the tiny recipe on one worker in a local folder, keeping 3 checkpoints (`LOCAL`), run as in a pod
  (KUBERNETES_SERVICE_HOST set, standard error a pipe: JSON log lines): the reference that the trust tests copy, the
  log test's run and the eager twin of the compiled run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from s3fs import S3FileSystem

from service.spec import StorageSpec
from service.storage.filesystem import filesystem
from tests.support.runs import (
    IN_A_POD,
    LOCAL,
    S3_ENV,
    SHARED,
    TINY_STEPS_PER_EPOCH,
    Run,
    copy_tree,
    resumed_step,
    run_barlow,
    train_args,
)


@contextmanager
def s3_credentials() -> Iterator[None]:
    """The test credentials in this process's environment, for what a session fixture reads or copies itself."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in S3_ENV.items():
            patch.setenv(key, value)
        S3FileSystem.clear_instance_cache()
        yield
    S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def shared_bucket(s3_server) -> str:
    return s3_server.create_bucket("shared-runs")


@pytest.fixture(scope="session")
def tiny_run(s3_server, shared_bucket) -> Run:
    url = f"{shared_bucket}/tiny"
    result = run_barlow(*train_args(url, *SHARED, endpoint=s3_server.endpoint_url), torchrun=2, env=S3_ENV)
    assert result.returncode == 0, result.stderr[-4000:]
    return Run(url, StorageSpec(endpoint_url=s3_server.endpoint_url), result)


@pytest.fixture(scope="session")
def resumed_run(tiny_run, shared_bucket) -> Run:
    url = f"{shared_bucket}/resumed"
    with s3_credentials():
        fs, source = filesystem(tiny_run.url, tiny_run.storage)
        copy_tree(fs, source, filesystem(url, tiny_run.storage)[1],
                  skip=(f"checkpoints/step-{TINY_STEPS_PER_EPOCH:09d}", "resnet18.pth"))
    result = run_barlow(*train_args(url, *SHARED, endpoint=tiny_run.endpoint), torchrun=2, env=S3_ENV)
    assert result.returncode == 0, result.stderr[-4000:]
    assert resumed_step(result.stderr) == 12
    return Run(url, tiny_run.storage, result)


@pytest.fixture(scope="session")
def local_run(tmp_path_factory) -> Run:
    output = tmp_path_factory.mktemp("local") / "run"
    # warnings shown, as outside the tests: the log test requires every line of standard error to be JSON
    result = run_barlow(*train_args(str(output), *LOCAL), threads=2, env={**IN_A_POD, "PYTHONWARNINGS": ""})
    assert result.returncode == 0, result.stderr[-4000:]
    return Run(str(output), StorageSpec(), result)
