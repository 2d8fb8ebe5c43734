"""The TorchX component launched for real on this machine with `barlow submit --scheduler local_cwd`, as a laptop
user would: a job resumed on fewer workers keeps the spec's global batch and learning rate, and sees the same views.
Its twin is the shared tiny run (tests/e2e/conftest.py), trained with the same settings on 2 workers. A `torchx run`
job whose worker is killed and that is pre-empted is tests/e2e/test_resume.py's.
"""

import os
import subprocess

import pytest
import torch

from service.checkpoint.catalog import list_checkpoints
from service.checkpoint.export import read_weights
from service.spec import StorageSpec
from tests.support.runs import (
    BIN,
    DIGITS,
    ROOT,
    S3_ENV,
    SHARED,
    environment,
    overrides,
    resumed_step,
    stats_records,
    step_losses,
)

ON_PATH = {"PATH": f"{BIN}:{os.environ['PATH']}"}  # torchx's local_cwd scheduler starts `torchrun` from the PATH


def test_barlow_submit_resumes_on_fewer_workers_keeping_the_optimisation_and_the_views(tiny_run, aws_env, tmp_path):
    """`barlow submit` starts one worker from the shared 2-worker run's mid-epoch checkpoint (step 12), into a new
    output (trains its own run: the one on fewer workers). The global batch, the learning rate and the views (the
    colour drawn on the device per global row) stay those of the 2-worker run, so it ends as that run did, up to the
    order of the float32 sums."""
    output = tmp_path / "shrunk"
    checkpoint = f"{tiny_run.url}/checkpoints/step-000000012"
    result = subprocess.run(
        [str(BIN / "barlow"), "submit", DIGITS, "--scheduler", "local_cwd", "--nproc-per-node", "1",
         *overrides(*SHARED, f"run.output={output}", f"storage.endpoint_url={tiny_run.endpoint}",
                    f"checkpoint.resume={checkpoint}")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=environment(env={**ON_PATH, **S3_ENV}))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    handle = result.stdout.splitlines()[0]
    assert handle.startswith("local_cwd://") and result.stdout.rstrip().endswith(f"{handle}: SUCCEEDED")
    log = result.stdout  # the worker's log, streamed
    assert "on 1 worker(s)" in log and "global batch 64" in log and resumed_step(log) == 12
    assert [c.step for c in list_checkpoints(str(output), StorageSpec()) if c.valid] == [16]

    losses = step_losses(stats_records((output / "stats.txt").read_text()))
    expected = step_losses(tiny_run.records())
    assert sorted(losses) == [12, 13, 14, 15]
    # One worker sums the same terms in another order than two, so float32 results differ in the last bits
    # (~1e-7 relative at the first step on one worker) and the difference grows a little with every step: the
    # losses stay within 1e-4, the weights within 1e-6, and all parameters together (BatchNorm scales and shifts
    # of the zero-initialised residual branches, which start at 0, are the most sensitive) within 1e-4 in norm.
    for step, values in losses.items():
        assert values == [pytest.approx(expected[step][0], rel=1e-4)], step
    backbone = torch.load(output / "resnet18.pth", weights_only=True)
    expected_backbone = read_weights(f"{tiny_run.url}/resnet18.pth", tiny_run.storage)
    parameters = [key for key, value in expected_backbone.items() if value.is_floating_point() and "running" not in key]
    for key in parameters:
        if expected_backbone[key].ndim > 1:
            torch.testing.assert_close(backbone[key], expected_backbone[key], rtol=1e-5, atol=1e-6, msg=key)
    ours = torch.cat([backbone[key].flatten() for key in parameters])
    theirs = torch.cat([expected_backbone[key].flatten() for key in parameters])
    assert (ours - theirs).norm() <= 1e-4 * theirs.norm()
