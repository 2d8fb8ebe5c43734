"""components/barlowtwins.py: the TorchX components called from Python and through `torchx run`'s command line in
this process (tests/support/commands.py): TorchX's checks, the AppDef and the spec it carries, every argument of
`train` and `evaluate`, no credential in a pod's arguments, and every refusal before a job is created.

torchx 0.7.0's CLI hands Optional[int] arguments over as strings ("8"); calling the component from Python never
shows that, so the command-line tests go through torchx's CLI, which parses the command line here as in the
executable. The Volcano Job the project's scheduler renders: tests/unit/launch/test_scheduler.py; `barlow submit`:
tests/unit/cli/test_jobs.py; the executables: tests/e2e/test_torchx_cli.py."""

from __future__ import annotations

import inspect

import pytest
import yaml
from torchx import specs
from torchx.schedulers import get_scheduler_factories
from torchx.specs.file_linter import validate
from torchx.specs.finder import get_components

import components.barlowtwins as barlowtwins
from components.barlowtwins import IMAGE_REFERENCE, evaluate, parse_nnodes, train
from service.launch.jobset import JobSetScheduler
from service.launch.torchx_api import SubmissionError
from service.launch.volcano import BarlowKubernetesScheduler
from service.spec import EvaluateSpec, TrainSpec, load_spec, spec_digest
from tests.support.commands import (
    EVERY_ARGUMENT,
    barlow,
    containers,
    environment,
    shipped_spec,
    torchrun_arguments,
    torchx,
    torchx_job,
    volume_of,
)
from tests.support.k8s_schemas import template_as_pod, validate_core, validate_volcano
from tests.support.runs import ROOT

COMPONENT = "components/barlowtwins.py"
DIGITS = str(ROOT / "specs" / "digits.yaml")
SECRET = "Sekr1tValue"  # what must never be printed


def command(app: specs.AppDef) -> str:
    role = app.roles[0]
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    return role.args[1]


def option(text: str, name: str) -> str:
    return text.split(f"{name} ")[1].split()[0]


def shipped(app: specs.AppDef) -> TrainSpec:
    """The spec the pods will read, as they read it."""
    env = app.roles[0].env
    assert spec_digest(env["BARLOW_SPEC"]) == env["BARLOW_SPEC_SHA256"]
    return yaml.safe_load(env["BARLOW_SPEC"])


def test_component_passes_torchx_validation():
    assert validate(COMPONENT, "train") == [] and validate(COMPONENT, "evaluate") == []


def test_registered_with_the_builtins_kept():
    assert {"barlowtwins.train", "barlowtwins.evaluate", "dist.ddp", "utils.echo"} <= set(get_components())
    schedulers = get_scheduler_factories()
    assert set(schedulers) == {"local_cwd", "local_docker", "kubernetes", "jobset"}
    assert isinstance(schedulers["kubernetes"](session_name="test"), BarlowKubernetesScheduler)
    assert isinstance(schedulers["jobset"](session_name="test"), JobSetScheduler)


def test_evaluate_component_runs_barlow_evaluate_like_training():
    app = evaluate("specs/imagenet-linear.yaml", "eval.mode=finetune", nnodes="2", h="gpu_8xh100")
    text = command(app)
    assert "-m service evaluate env:BARLOW_SPEC" in text and "--set" not in text
    assert shipped(app)["eval"]["mode"] == "finetune"
    assert app.roles[0].name == "evaluator" and app.roles[0].num_replicas == 2
    assert option(text, "--nproc_per_node") == "8"


def test_the_resolved_spec_travels_in_the_job_not_its_path():
    app = train("specs/digits.yaml", "optim.epochs=3", "run.output=s3://b/r", nproc_per_node=2)
    text = command(app)
    assert text.endswith("-m service train env:BARLOW_SPEC") and "digits.yaml" not in text
    expected = load_spec(ROOT / "specs" / "digits.yaml", ["optim.epochs=3", "run.output=s3://b/r"], world_size=2)
    assert TrainSpec.model_validate(shipped(app)) == expected


def test_single_node_cpu_job():
    app = train("specs/digits.yaml", nproc_per_node=2)
    role = app.roles[0]
    text = command(app)
    # torchrun's entry point as the pod's main process, exiting 2 on a worker's user error
    assert text.startswith("exec python -m service.launch.torchrun ")
    assert option(text, "--rdzv_backend") == "c10d" and option(text, "--rdzv_endpoint") == "localhost:0"
    assert option(text, "--nnodes") == "1" and option(text, "--nproc_per_node") == "2"
    assert int(option(text, "--max_restarts")) > 0  # torchx's dist.ddp passes none: any failure ends the job
    assert (role.num_replicas, role.min_replicas) == (1, 1)
    # sized for 2 CPU workers, not torchx's 2 CPUs / 1 GiB default
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (4, 0, 8192)


def test_elastic_multi_node_gpu_job():
    app = train("specs/imagenet-1000ep.yaml", nnodes="2:4", gpu=8, env={"AWS_REGION": "eu-west-1"},
                mounts="type=volume,src=imagenet,dst=/data/imagenet,readonly".split(","), max_restarts=5)
    role = app.roles[0]
    text = command(app)
    assert option(text, "--nnodes") == "2:4" and option(text, "--nproc_per_node") == "8"
    assert option(text, "--max_restarts") == "5" and option(text, "--rdzv_id") == "'${app_id}'"
    assert option(text, "--rdzv_endpoint") == "$${${rank0_env}:=localhost}:29500"  # the first node's address
    assert (role.num_replicas, role.min_replicas) == (4, 2)
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (80, 8, 8 * 80 * 1024)
    assert role.port_map == {"c10d": 29500}
    assert role.env["AWS_REGION"] == "eu-west-1"
    (mount,) = role.mounts
    assert (mount.src, mount.dst_path, mount.read_only) == ("imagenet", "/data/imagenet", True)


def test_named_resource_sizes_the_node_and_explicit_values_ask_for_part_of_it():
    role = train("specs/imagenet-1000ep.yaml", h="gpu_8xh100").roles[0]
    node = specs.resource(h="gpu_8xh100")
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (node.cpu, node.gpu, node.memMB)
    part = train("specs/imagenet-1000ep.yaml", h="gpu_8xh100", gpu=4, cpu=80, memMB=500_000).roles[0]
    assert (part.resource.cpu, part.resource.gpu, part.resource.memMB) == (80, 4, 500_000)
    assert option(command(train("specs/imagenet-1000ep.yaml", h="gpu_8xa100")), "--nproc_per_node") == "8"


@pytest.mark.parametrize("arguments, message", [
    ({"h": "gpu_8xh100", "memMB": 2_000_000}, "memMB=2000000 does not fit a gpu_8xh100 node"),
    ({"h": "gpu_8xh100", "cpu": 500}, "cpu=500 does not fit"),
    ({"h": "gpu_8xa100", "gpu": 16}, "gpu=16 does not fit"),
    ({"h": "gpu_8xh10"}, "Did you mean `gpu_8xh100`"),
    ({"gpu": 4, "nproc_per_node": 8}, "one worker per GPU"),
    ({"gpu": 1, "memMB": 4096, "shmMB": 8192}, "shmMB=8192 must be less than the node's memory"),
    ({"nproc_per_node": "eight"}, "nproc_per_node must be a whole number"),
    ({"nproc_per_node": "0"}, "nproc_per_node must be >= 1"),
    ({"max_restarts": -1}, "max_restarts must be >= 0"),
    ({"image": "Registry/Bad Image:1"}, "is not an image reference"),
    ({"image": "r/bt:"}, "is not an image reference"),
])
def test_jobs_that_cannot_run_are_refused_before_they_exist(arguments, message):
    with pytest.raises(SubmissionError, match=message):
        train("specs/imagenet-1000ep.yaml", **arguments)


@pytest.mark.parametrize("image", ["barlowtwins-service:latest", "registry.example.com:5000/barlow/trainer:1.0",
                                   "localhost/bt", "r/bt:1@sha256:" + "a" * 64, "ghcr.io/org/bt_x-y.z:v1.2-rc"])
def test_image_references_that_are_fine(image):
    assert IMAGE_REFERENCE.fullmatch(image)


@pytest.mark.parametrize("nnodes", ["0", "4:2", "two", "2:", ":4", "1:2:3", ""])
def test_bad_nnodes_are_rejected_clearly(nnodes):
    with pytest.raises(SubmissionError, match="nnodes"):
        train("specs/digits.yaml", nnodes=nnodes)


def test_nnodes_parsing():
    assert parse_nnodes("3") == (3, 3) and parse_nnodes("2:4") == (2, 4)


def test_the_spec_is_validated_against_the_largest_world():
    with pytest.raises(SubmissionError, match="smaller than the 16 workers"):
        train("specs/digits.yaml", "optim.batch_size=8", nnodes="1:2", gpu=8)


def test_a_spec_of_the_other_kind_names_the_right_component():
    with pytest.raises(SubmissionError, match="barlowtwins.evaluate"):
        train("specs/digits-linear.yaml")
    with pytest.raises(SubmissionError, match="barlowtwins.train"):
        evaluate("specs/digits.yaml")


def test_a_spec_inside_the_image_is_passed_as_a_path_with_its_overrides():
    app = train("image:specs/imagenet-1000ep.yaml", "optim.epochs=10", nnodes="2", gpu=8)
    assert command(app).endswith("-m service train specs/imagenet-1000ep.yaml --set optim.epochs=10")
    assert "BARLOW_SPEC" not in app.roles[0].env
    with pytest.raises(SubmissionError, match="did you mean 'epochs'"):  # this tree's copy is checked
        train("image:specs/imagenet-1000ep.yaml", "optim.epoch=10")
    only_in_image = train("image:/opt/site/specs/mine.yaml", "run.output=s3://b/r")
    assert command(only_in_image).endswith("-m service train /opt/site/specs/mine.yaml --set run.output=s3://b/r")


def test_bad_mounts_are_refused_clearly():
    with pytest.raises(SubmissionError, match="mounts 'type=volume,dst=/data'"):
        train("specs/digits.yaml", mounts=["type=volume", "dst=/data"])


# ---- through `torchx run`'s command line, in this process ----

SPECS = {"barlowtwins.train": ("specs/imagenet-1000ep.yaml", TrainSpec, ["optim.epochs=50", "run.output=s3://b/r"]),
         "barlowtwins.evaluate": ("specs/imagenet-linear.yaml", EvaluateSpec,
                                  ["eval.mode=finetune", "run.output=s3://b/e", "backbone.weights=s3://b/r"])}


@pytest.mark.parametrize("component", [barlowtwins.train, barlowtwins.evaluate])
def test_every_argument_is_covered_here(component):
    assert set(inspect.signature(component).parameters) == set(EVERY_ARGUMENT)


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
        # a user's error ends the job; a fixed-size job cannot go on without a lost pod: Volcano recreates it all
        assert task["maxRetry"] == 3 and task["policies"] == [{"exitCode": 2, "action": "TerminateJob"},
                                                              {"event": "PodEvicted", "action": "RestartJob"},
                                                              {"event": "PodFailed", "action": "RestartJob"}]


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


# ---- the TorchX component: no credential in a pod's arguments ----

@pytest.mark.parametrize("component", [barlowtwins.train, barlowtwins.evaluate])
@pytest.mark.parametrize("override, named", [
    (f"storage.options.secret={SECRET}", "'secret'"),
    (f"storage.options.client_kwargs.aws_secret_access_key={SECRET}", "'aws_secret_access_key'"),
    (f"storage.options={{token: {SECRET}}}", "'token'"),
    (f"storage.endpoint_url=https://minio:{SECRET}@minio:9000", "user info"),
])
def test_component_refuses_a_credential_override(component, override, named):
    with pytest.raises(ValueError) as caught:
        component("specs/digits.yaml", "optim.epochs=2", override)
    message = str(caught.value)
    assert named in message and override.partition("=")[0] in message and SECRET not in message
    assert "credentials_secret" in message


def test_component_keeps_ordinary_overrides():
    app = barlowtwins.train("specs/digits.yaml", "optim.epochs=2", "storage.endpoint_url=http://minio:9000",
                            "storage.options.client_kwargs.region_name=eu-west-1")
    shipped = yaml.safe_load(app.roles[0].env["BARLOW_SPEC"])
    assert shipped["optim"]["epochs"] == 2 and shipped["storage"]["endpoint_url"] == "http://minio:9000"
    assert shipped["storage"]["options"] == {"client_kwargs": {"region_name": "eu-west-1"}}


def test_torchx_run_and_barlow_submit_refuse_a_secret_override():
    result = torchx("run", "--dryrun", "--workspace", "", "-s", "local_cwd", "components/barlowtwins.py:train",
                    "--spec", "specs/digits.yaml", f"storage.options.secret={SECRET}")
    assert result.returncode != 0 and "sets a credential ('secret')" in result.stderr
    assert SECRET not in result.stdout + result.stderr
    result = barlow("submit", DIGITS, "--scheduler", "local_cwd", "--dryrun",
                    "--set", f"storage.options.client_kwargs.aws_secret_access_key={SECRET}")
    assert result.returncode == 2
    assert "barlow: override storage.options.client_kwargs.aws_secret_access_key=... sets a credential" in result.stderr
    assert SECRET not in result.stdout + result.stderr
