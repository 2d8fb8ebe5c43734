"""service/cli/jobs.py: `barlow submit` through its entry point in this process (tests/support/commands.py): an
option for every argument of the components, the same Volcano Job as `torchx run` field by field, the same refusals
before anything is created, one line without a cluster. The executable: tests/e2e/test_torchx_cli.py."""

from __future__ import annotations

import pytest

from tests.support.commands import (
    EVERY_ARGUMENT,
    barlow,
    barlow_job,
    normalised,
    torchx_job,
)
from tests.support.k8s_schemas import template_as_pod, validate_core, validate_volcano


def test_barlow_submit_has_an_option_for_every_argument():
    from service.cli.jobs import COMPONENT_ARGUMENTS
    from service.cli.parser import build_parser

    submit = build_parser().parse_args(["submit", "s.yaml", "--scheduler", "kubernetes"])
    assert {"spec", "overrides", *COMPONENT_ARGUMENTS} == set(EVERY_ARGUMENT)
    assert all(hasattr(submit, option) for option in COMPONENT_ARGUMENTS.values())


@pytest.mark.parametrize("torchx_arguments, barlow_arguments", [
    (["--nnodes", "2:4", "--nproc_per_node", "8", "--gpu", "8", "--max_restarts", "5", "--max_retries", "1",
      "--env", "AWS_REGION=eu-west-1", "--mounts", "type=volume,src=imagenet,dst=/data/imagenet,readonly"],
     ["--nnodes", "2:4", "--nproc-per-node", "8", "--gpu", "8", "--max-restarts", "5", "--max-retries", "1",
      "--env", "AWS_REGION=eu-west-1", "--mount", "type=volume,src=imagenet,dst=/data/imagenet,readonly"]),
    (["--h", "gpu_8xa100", "--nnodes", "3", "--image", "r/bt:1", "--cpu", "80", "--memMB", "500000",
      "--shmMB", "60000", "--rdzv_port", "29999", "--name", "same"],
     ["--h", "gpu_8xa100", "--nnodes", "3", "--image", "r/bt:1", "--cpu", "80", "--mem-mb", "500000",
      "--shm-mb", "60000", "--rdzv-port", "29999", "--name", "same"]),
])
def test_torchx_run_and_barlow_submit_create_the_same_job(torchx_arguments, barlow_arguments):
    overrides = ["optim.epochs=10", "run.output=s3://bucket/runs/x"]
    options = ["tolerations=dedicated:training:NoSchedule", "credentials_secret=barlow-s3-credentials",
               "image_pull_secrets=registry"]
    from_torchx = torchx_job("-cfg", ",".join(options), "barlowtwins.train", "--spec", "specs/imagenet-1000ep.yaml",
                             *torchx_arguments, *overrides)
    from_barlow = barlow_job("specs/imagenet-1000ep.yaml", *barlow_arguments,
                             *[part for o in overrides for part in ("--set", o)],
                             "--toleration", "dedicated=training:NoSchedule", "--s3-secret", "barlow-s3-credentials",
                             "--image-pull-secret", "registry")
    assert normalised(from_torchx) == normalised(from_barlow)
    for job in (from_torchx, from_barlow):
        validate_volcano(job)
        for task in job["spec"]["tasks"]:
            validate_core(template_as_pod(task["template"]))
        # .torchxconfig's priority class applies to both, as do the run options given
        assert job["spec"]["priorityClassName"] == "barlow-training" and job["spec"]["queue"] == "barlow"
        pod = job["spec"]["tasks"][0]["template"]["spec"]
        assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "barlow-s3-credentials"}}]
        assert pod["imagePullSecrets"] == [{"name": "registry"}]
        assert {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"} in \
            pod["tolerations"]


@pytest.mark.parametrize("arguments, message", [
    (["specs/digits.yaml", "--set", "optim.lr_weight=1", "--set", "run.output=s3://b/r"], "did you mean 'lr_weights'"),
    (["specs/digits.yaml"], "run.output=runs/digits is a path on the pod's own disk"),
    (["specs/digits.yaml", "--image", "Bad:Image:1", "--set", "run.output=s3://b/r"], "is not an image reference"),
    (["specs/digits.yaml", "--gpu", "2", "--nproc-per-node", "3", "--set", "run.output=s3://b/r"],
     "exceeds the 2 GPUs"),
])
def test_barlow_submit_refuses_the_same_way(arguments, message):
    result = barlow("submit", *arguments, "--scheduler", "kubernetes")
    assert result.returncode == 2 and result.stderr.startswith("barlow: ") and message in result.stderr
    # one line, or a spec's header line and one indented line per problem
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and all(line.startswith("  ") for line in lines[1:]), result.stderr


def test_barlow_submit_without_a_cluster_says_so_in_one_line():
    result = barlow("submit", "specs/digits.yaml", "--scheduler", "kubernetes", "--set", "run.output=s3://b/r")
    assert result.returncode == 2 and result.stderr.startswith("barlow: the job was not created: the Kubernetes API")
    assert "KUBECONFIG" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
