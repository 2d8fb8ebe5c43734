"""TorchX components and the Kubernetes jobs they become, called from Python: the AppDef, the spec it carries, the
project's scheduler's Volcano Job, and the checks that refuse a job before it is created. The same through the
`torchx` and `barlow` command lines is tests/unit/test_torchx_cli.py (the executables: tests/e2e/)."""

from pathlib import Path

import pytest
import yaml
from torchx import specs
from torchx.runner import get_runner
from torchx.schedulers import get_scheduler_factories
from torchx.specs.file_linter import validate
from torchx.specs.finder import get_components

from components.barlowtwins import IMAGE_REFERENCE, evaluate, parse_nnodes, train
from service.launch.scheduler import BarlowKubernetesScheduler, complete_volcano_job, parse_toleration
from service.launch.torchx_api import SubmissionError, run_option
from service.spec import TrainSpec, load_spec, spec_digest
from tests.support.k8s_schemas import template_as_pod, validate_core, validate_volcano

COMPONENT = "components/barlowtwins.py"
ROOT = Path(__file__).resolve().parents[2]


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
    assert set(schedulers) == {"local_cwd", "local_docker", "kubernetes"}
    assert isinstance(schedulers["kubernetes"](session_name="test"), BarlowKubernetesScheduler)


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
    assert text.startswith("torchrun ")
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


def rendered(nnodes: str, app: specs.AppDef | None = None, **cfg) -> tuple[specs.AppDef, dict]:
    app = app or train("specs/imagenet-1000ep.yaml", "run.output=s3://bucket/runs/x", nnodes=nnodes, gpu=8)
    info = get_runner().dryrun(app, "kubernetes", cfg=cfg, workspace=None)
    return app, info.request.resource


@pytest.mark.parametrize("nnodes", ["1", "2:4"])
def test_rendered_volcano_job_validates_against_the_crd_and_kubernetes(nnodes):
    app, job = rendered(nnodes, credentials_secret="barlow-s3-credentials", image_pull_secrets=["registry"],
                        tolerations=["dedicated=training:NoSchedule"], node_selector={"pool": "h100"})
    validate_volcano(job)
    assert job["spec"]["queue"] == "barlow" and "priorityClassName" not in job["spec"]
    tasks = job["spec"]["tasks"]
    low, high = parse_nnodes(nnodes)
    assert len(tasks) == high and [t.get("minAvailable", 1) for t in tasks] == [1] * low + [0] * (high - low)
    for task in tasks:
        pod = template_as_pod(task["template"])
        validate_core(pod)
        spec = pod["spec"]
        container = spec["containers"][0]
        assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"] \
            == f"{app.roles[0].resource.memMB}Mi"
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{8 * 8 * 1024}Mi"}
        assert spec["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
        assert spec["automountServiceAccountToken"] is False
        assert container["envFrom"] == [{"secretRef": {"name": "barlow-s3-credentials"}}]
        assert spec["imagePullSecrets"] == [{"name": "registry"}] and spec["nodeSelector"] == {"pool": "h100"}
        assert spec["tolerations"] == [
            {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"},
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert spec["serviceAccountName"] == "barlow-trainer"


def test_other_components_get_the_generic_fixes_but_keep_their_image_user():
    app = specs.AppDef("echo", roles=[specs.Role("echo", image="alpine:3", entrypoint="echo", args=["hi"],
                                                 resource=specs.Resource(cpu=1, gpu=0, memMB=2048))])
    _, job = rendered("1", app=app, tolerations=["pool:cpu:NoExecute"])
    validate_volcano(job)
    pod = job["spec"]["tasks"][0]["template"]["spec"]
    assert pod["containers"][0]["resources"]["requests"]["memory"] == "2048Mi"
    assert pod["tolerations"] == [{"key": "pool", "operator": "Equal", "value": "cpu", "effect": "NoExecute"}]
    assert "securityContext" not in pod and pod["containers"][0]["securityContext"] == {}


@pytest.mark.parametrize("output, mounts, refused", [
    ("./checkpoint", None, True),
    ("/runs/x", None, True),
    ("file:///runs/x", None, True),
    ("memory://runs/x", None, True),
    ("/runs/x", ["type=volume", "src=runs", "dst=/runs"], False),
    ("/runsx/y", ["type=volume", "src=runs", "dst=/runs"], True),
    ("s3://bucket/runs/x", None, False),
    ("gs://bucket/runs/x", None, False),
])
def test_a_run_output_pods_cannot_keep_is_refused_on_kubernetes(output, mounts, refused):
    app = train("specs/digits.yaml", f"run.output={output}", mounts=mounts)
    if refused:
        with pytest.raises(SubmissionError, match="pod's own disk|memory of one process"):
            rendered("1", app=app)
    else:
        validate_volcano(rendered("1", app=app)[1])
    get_runner().dryrun(app, "local_cwd", cfg={})  # on this machine a local folder is where runs go


@pytest.mark.parametrize("text, expected", [
    ("nvidia.com/gpu:NoSchedule", {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}),
    ("pool=a100:NoExecute", {"key": "pool", "operator": "Equal", "value": "a100", "effect": "NoExecute"}),
    ("pool:a100:NoExecute", {"key": "pool", "operator": "Equal", "value": "a100", "effect": "NoExecute"}),
])
def test_tolerations(text, expected):
    assert parse_toleration(text) == expected


@pytest.mark.parametrize("text", ["gpu:Sometimes", "NoSchedule", ":NoSchedule"])
def test_bad_toleration_is_rejected(text):
    with pytest.raises(SubmissionError, match="key\\[=value\\]:Effect"):
        parse_toleration(text)


def test_bad_mounts_are_refused_clearly():
    with pytest.raises(SubmissionError, match="mounts 'type=volume,dst=/data'"):
        train("specs/digits.yaml", mounts=["type=volume", "dst=/data"])


def test_device_mounts_are_refused_on_kubernetes():
    app = train("specs/digits.yaml", "run.output=s3://b/r", mounts=["type=device", "src=/dev/fuse"])
    with pytest.raises(SubmissionError, match="privileged"):
        rendered("1", app=app)


def test_the_completion_reads_run_options_as_mapping_or_attributes():
    """torchx 0.8 passes a dataclass where 0.7 passes a dict: the seam reads both."""
    class Options:
        credentials_secret = "s"
        tolerations = None
    assert run_option(Options(), "credentials_secret") == "s" and run_option(Options(), "tolerations", []) == []
    assert run_option({"credentials_secret": "s"}, "credentials_secret") == "s"
    app, job = rendered("1")
    assert complete_volcano_job(job, app, Options())["spec"]["tasks"][0]["template"]["spec"]["containers"][0][
        "envFrom"] == [{"secretRef": {"name": "s"}}]


def test_strict_validation_catches_a_broken_completion():
    _, job = rendered("1")
    job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "lots"
    with pytest.raises(AssertionError):
        validate_volcano(job)
