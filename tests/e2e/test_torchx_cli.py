"""The components as users launch them, through the real `torchx` and `barlow` executables in subprocesses: they
render the job their entry points render in process (so tests/unit/components/test_barlowtwins.py and
tests/unit/cli/test_jobs.py, which run every argument there, hold for the executables), they refuse with their exit
status and one line on stderr, and the rendered container command, run as a pod would run it, trains on exactly
the spec validated at submission.
"""

from __future__ import annotations

import os
import subprocess

from service.spec import StorageSpec
from service.storage.filesystem import filesystem
from tests.support.commands import (
    BARLOW,
    BIN,
    barlow,
    barlow_job,
    containers,
    environment,
    normalised,
    torchx,
    torchx_job,
)
from tests.support.k8s_schemas import template_as_pod, validate_core, validate_volcano
from tests.support.runs import DIGITS, ROOT, TINY, TINY_STEPS_PER_EPOCH


def test_the_executables_render_the_job_their_entry_points_render():
    overrides = ["optim.epochs=10", "run.output=s3://bucket/runs/x"]
    options = ["tolerations=dedicated:training:NoSchedule", "credentials_secret=barlow-s3-credentials",
               "image_pull_secrets=registry"]
    torchx_arguments = ["-cfg", ",".join(options), "barlowtwins.train", "--spec", "specs/imagenet-1000ep.yaml",
                        "--nnodes", "2:4", "--nproc_per_node", "8", "--gpu", "8", "--max_restarts", "5",
                        "--max_retries", "1", "--env", "AWS_REGION=eu-west-1",
                        "--mounts", "type=volume,src=imagenet,dst=/data/imagenet,readonly", *overrides]
    from_torchx = torchx_job(*torchx_arguments, executable=True)
    from_barlow = barlow_job("specs/imagenet-1000ep.yaml", "--nnodes", "2:4", "--nproc-per-node", "8", "--gpu", "8",
                             "--max-restarts", "5", "--max-retries", "1", "--env", "AWS_REGION=eu-west-1",
                             "--mount", "type=volume,src=imagenet,dst=/data/imagenet,readonly",
                             *[part for o in overrides for part in ("--set", o)],
                             "--toleration", "dedicated=training:NoSchedule", "--s3-secret", "barlow-s3-credentials",
                             "--image-pull-secret", "registry", executable=True)
    assert normalised(from_torchx) == normalised(from_barlow) == normalised(torchx_job(*torchx_arguments))
    validate_volcano(from_torchx)
    for task in from_torchx["spec"]["tasks"]:
        validate_core(template_as_pod(task["template"]))


def test_torchx_run_refuses_before_creating_anything():
    """One refusal of the executable (not a dry run: the job would be created, were the checks not first): exit 1,
    the message, no traceback, the refused credential named and never echoed. Every refusal in process:
    tests/unit/components/test_barlowtwins.py."""
    secret = "Sekr1t-in-env"
    result = torchx("run", "--workspace", "", "-s", "kubernetes", "barlowtwins.train", "--spec", "specs/digits.yaml",
                    "--env", f"AWS_SECRET_ACCESS_KEY={secret}", "run.output=s3://b/r", executable=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "env AWS_SECRET_ACCESS_KEY=... would put a credential" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and secret not in result.stdout + result.stderr


def test_barlow_submit_refuses_the_same_way():
    result = barlow("submit", "specs/digits.yaml", "--set", "optim.lr_weight=1", "--set", "run.output=s3://b/r",
                    "--scheduler", "kubernetes", executable=True)
    assert result.returncode == 2 and result.stderr.startswith("barlow: ") and "did you mean 'lr_weights'" in \
        result.stderr
    # a spec's header line and one indented line per problem
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and all(line.startswith("  ") for line in lines[1:]), result.stderr


def test_barlow_submit_without_a_cluster_says_so_in_one_line():
    result = barlow("submit", "specs/digits.yaml", "--scheduler", "kubernetes", "--set", "run.output=s3://b/r",
                    executable=True)
    assert result.returncode == 2 and result.stderr.startswith("barlow: the job was not created: the Kubernetes API")
    assert "KUBECONFIG" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_pods_run_the_shipped_spec_byte_for_byte(s3_bucket, s3_server, tmp_path):
    """The rendered container command, run in an empty folder after the user's spec file is gone: it trains on
    exactly the spec validated at submission, and records it unchanged in run.output/spec.yaml. It trains a run of
    its own, since that training, started by the rendered command, is what is tested: the tiny recipe, given as the
    user's overrides of their own copy of the digits spec."""
    user_folder, empty = tmp_path / "user", tmp_path / "pod"
    user_folder.mkdir(), empty.mkdir()
    spec = user_folder / "mine.yaml"
    spec.write_text((ROOT / DIGITS).read_text())
    run_url = f"{s3_bucket}/runs/shipped"
    job = torchx_job("barlowtwins.train", "--spec", str(spec), *TINY, f"run.output={run_url}",
                     f"storage.endpoint_url={s3_server.endpoint_url}", cwd=user_folder)
    spec.unlink()
    (container,) = containers(job)
    env = {**os.environ, **environment(container), "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(container["command"], cwd=empty, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"done: {TINY_STEPS_PER_EPOCH} steps" in result.stdout + result.stderr
    fs, path = filesystem(run_url, StorageSpec(endpoint_url=s3_server.endpoint_url))
    assert fs.cat_file(f"{path}/spec.yaml").decode() == environment(container)["BARLOW_SPEC"]
    assert list(empty.iterdir()) == []  # nothing was read from, or written to, the pod's working folder

    tampered = {**env, "BARLOW_SPEC": environment(container)["BARLOW_SPEC"].replace("epochs: 1", "epochs: 2")}
    refused = subprocess.run([BARLOW, "train", "env:BARLOW_SPEC"], cwd=empty, env=tampered, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "does not match BARLOW_SPEC_SHA256" in refused.stderr, refused.stderr
