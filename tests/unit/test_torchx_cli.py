"""The components as users launch them: `torchx run` and `barlow submit` command lines, for every argument of
`train` and `evaluate`, through the CLIs' entry points in this process (tests/support/commands.py). The rendered
Volcano Job is parsed, its container command is parsed with torchrun's own argument parser, and the spec the pods
will read is checked.

torchx 0.7.0's CLI hands Optional[int] arguments over as strings ("8"); calling the component from Python never
shows that, so these tests never call it from Python: torchx's CLI parses the command line here as in the
executable. The executables themselves, rendering the same job and refusing with their exit status and one line
on stderr, and the pods' command run as a pod would: tests/e2e/test_torchx_cli.py.
"""

from __future__ import annotations

import inspect

import pytest
import yaml

import components.barlowtwins as barlowtwins
from service.spec import EvaluateSpec, TrainSpec, load_spec
from tests.support.commands import (
    barlow,
    barlow_job,
    containers,
    environment,
    normalised,
    shipped_spec,
    torchrun_arguments,
    torchx,
    torchx_job,
    volume_of,
)
from tests.support.k8s_schemas import template_as_pod, validate_core, validate_volcano
from tests.support.runs import ROOT

# Every argument of the components, each with a value other than its default, as a user types it.
EVERY_ARGUMENT = {
    "spec": None,  # per component below
    "overrides": None,
    "image": ["--image", "registry.example.com:5000/barlow/trainer:1.2"],
    "nnodes": ["--nnodes", "2:3"],
    "nproc_per_node": ["--nproc_per_node", "4"],
    "h": None,  # a named resource replaces gpu/cpu/memMB: its own run below
    "gpu": ["--gpu", "4"],
    "cpu": ["--cpu", "40"],
    "memMB": ["--memMB", "300000"],
    "shmMB": ["--shmMB", "20000"],
    "max_restarts": ["--max_restarts", "7"],
    "max_retries": ["--max_retries", "2"],
    "rdzv_port": ["--rdzv_port", "29611"],
    "env": ["--env", "AWS_REGION=eu-west-1,NCCL_DEBUG=INFO"],
    "mounts": ["--mounts", "type=volume,src=imagenet,dst=/data/imagenet,readonly"],
    "name": ["--name", "bt-cli"],
}
SPECS = {"barlowtwins.train": ("specs/imagenet-1000ep.yaml", TrainSpec, ["optim.epochs=50", "run.output=s3://b/r"]),
         "barlowtwins.evaluate": ("specs/imagenet-linear.yaml", EvaluateSpec,
                                  ["eval.mode=finetune", "run.output=s3://b/e", "backbone.weights=s3://b/r"])}


@pytest.mark.parametrize("component", [barlowtwins.train, barlowtwins.evaluate])
def test_every_argument_is_covered_here(component):
    assert set(inspect.signature(component).parameters) == set(EVERY_ARGUMENT)


def test_barlow_submit_has_an_option_for_every_argument():
    from service.cli.jobs import COMPONENT_ARGUMENTS
    from service.cli.parser import build_parser

    submit = build_parser().parse_args(["submit", "s.yaml", "--scheduler", "kubernetes"])
    assert {"spec", "overrides", *COMPONENT_ARGUMENTS} == set(EVERY_ARGUMENT)
    assert all(hasattr(submit, option) for option in COMPONENT_ARGUMENTS.values())


@pytest.mark.parametrize("component", list(SPECS))
def test_every_argument_through_the_torchx_cli(component):
    spec, kind, overrides = SPECS[component]
    arguments = [part for value in EVERY_ARGUMENT.values() if value for part in value]
    job = torchx_job(component, "--spec", spec, *arguments, *overrides)
    validate_volcano(job)
    assert job["metadata"]["name"].startswith("bt-cli-")
    assert job["spec"]["maxRetry"] == 2
    tasks = job["spec"]["tasks"]
    assert [t.get("minAvailable") for t in tasks] == [1, 1, 0]  # 2:3 nodes
    for index, (task, container) in enumerate(zip(tasks, containers(job))):
        pod = task["template"]["spec"]
        validate_core(template_as_pod(task["template"]))
        # elastic (2:3): only a lost pod is recreated; the others go on
        assert task["maxRetry"] == 2 and {"event": "PodFailed", "action": "RestartTask"} in task["policies"]
        torchrun = torchrun_arguments(container)
        assert (torchrun.nnodes, torchrun.nproc_per_node, torchrun.max_restarts) == ("2:3", "4", 7)
        assert torchrun.rdzv_backend == "c10d" and torchrun.rdzv_id == job["metadata"]["name"]
        first = "localhost" if index == 0 else "${VC_" + ("TRAINER" if "train" in component else "EVALUATOR") + \
            "_0_HOSTS:=localhost}"
        assert container["command"][2].count(f"{first}:29611") == 1 or index == 0
        assert torchrun.rdzv_endpoint == "localhost:29611"
        assert torchrun.module and torchrun.training_script == "service"
        assert torchrun.training_script_args == [component.split(".")[1], "env:BARLOW_SPEC"]
        assert container["image"] == "registry.example.com:5000/barlow/trainer:1.2"
        assert container["ports"] == [{"containerPort": 29611, "name": "c10d"}]
        resources = container["resources"]
        assert resources["limits"] == {"cpu": "40000m", "memory": "300000Mi", "nvidia.com/gpu": "4"}
        assert resources["requests"]["memory"] == "300000Mi"
        assert volume_of(pod, "/dev/shm")["emptyDir"] == {"medium": "Memory", "sizeLimit": "20000Mi"}
        data = volume_of(pod, "/data/imagenet")
        assert data["persistentVolumeClaim"] == {"claimName": "imagenet"} and data["readOnly"] is True
        env = environment(container)
        assert (env["AWS_REGION"], env["NCCL_DEBUG"]) == ("eu-west-1", "INFO")
        expected = load_spec(ROOT / spec, overrides, world_size=3 * 4, kind=kind)
        assert kind.model_validate(shipped_spec(container)) == expected


@pytest.mark.parametrize("component", list(SPECS))
def test_a_named_resource_through_the_torchx_cli(component):
    spec, _, overrides = SPECS[component]
    job = torchx_job(component, "--spec", spec, "--h", "gpu_8xh100", "--nnodes", "2", *overrides)
    for task, container in zip(job["spec"]["tasks"], containers(job)):
        assert container["resources"]["limits"] == {"cpu": "176000m", "memory": f"{1536 * 1024}Mi",
                                                    "nvidia.com/gpu": "8"}
        assert torchrun_arguments(container).nproc_per_node == "8"
        assert volume_of(task["template"]["spec"], "/dev/shm")["emptyDir"]["sizeLimit"] == f"{128 * 1024}Mi"
        # a fixed-size job cannot go on without a lost pod: Volcano recreates the whole job
        assert task["maxRetry"] == 3 and task["policies"] == [{"event": "PodEvicted", "action": "RestartJob"},
                                                              {"event": "PodFailed", "action": "RestartJob"}]


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


def test_a_spec_outside_the_project_is_read_at_submission(tmp_path):
    """From a folder of the user's own (no .torchxconfig there): the job carries the spec's content."""
    spec = tmp_path / "mine.yaml"
    spec.write_text("data: {dataset: digits}\noptim: {epochs: 2, warmup_epochs: 1, batch_size: 64}\nrun: {output: s3://b/mine}\n")
    job = torchx_job("barlowtwins.train", "--spec", str(spec), "--gpu", "1", "model.projector=64-64", cwd=tmp_path)
    shipped = shipped_spec(containers(job)[0])
    assert shipped["optim"]["epochs"] == 2 and shipped["model"]["projector"] == "64-64"
    assert str(spec) not in yaml.safe_dump(job)


ENV_SECRET = "Sekr1t-in-env"
# What must fail before any image is built or any node booked: one line, no traceback, no job.
REFUSED = [
    (["--spec", "specs/digits.yaml", "optim.lr_weight=1", "run.output=s3://b/r"], "did you mean 'lr_weights'"),
    (["--spec", "specs/digits.yaml", "--nnodes", "1:2", "--gpu", "8", "optim.batch_size=8", "run.output=s3://b/r"],
     "smaller than the 16 workers"),
    (["--spec", "specs/nope.yaml"], "spec file specs/nope.yaml does not exist"),
    (["--spec", "specs/digits-linear.yaml"], "launch it with the evaluate component"),
    (["--spec", "specs/digits.yaml", "--image", "Registry/Trainer:1", "run.output=s3://b/r"],
     "is not an image reference"),
    (["--spec", "specs/digits.yaml"], "run.output=runs/digits is a path on the pod's own disk"),
    (["--spec", "specs/digits.yaml", "--h", "gpu_8xh100", "--memMB", "2000000", "run.output=s3://b/r"],
     "memMB=2000000 does not fit a gpu_8xh100 node"),
    (["--spec", "specs/digits.yaml", "--gpu", "4", "--nproc_per_node", "8", "run.output=s3://b/r"],
     "exceeds the 4 GPUs of a node"),
    (["--spec", "specs/digits.yaml", "--nproc_per_node", "two", "run.output=s3://b/r"],
     "nproc_per_node must be a whole number"),
    (["--spec", "specs/digits.yaml", "--env", f"AWS_SECRET_ACCESS_KEY={ENV_SECRET}", "run.output=s3://b/r"],
     "env AWS_SECRET_ACCESS_KEY=... would put a credential"),
]


@pytest.mark.parametrize("arguments, message", REFUSED, ids=[m for _, m in REFUSED])
def test_torchx_run_refuses_before_creating_anything(arguments, message):
    # not a dry run: the job would be created, were the checks not first (there is no cluster to reach here)
    result = torchx("run", "--workspace", "", "-s", "kubernetes", "barlowtwins.train", *arguments)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert ENV_SECRET not in result.stdout + result.stderr  # a refused credential is named, never echoed


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
