"""TorchX components and the Kubernetes jobs they become: AppDef, rendered Volcano Job, security checks."""

from pathlib import Path

import pytest
import yaml
from torchx import specs
from torchx.specs.finder import get_components
from torchx.specs.file_linter import validate

from components.barlowtwins import evaluate, parse_nnodes, train
from service.cli import main
from service.submit import KubernetesOptions, complete_volcano_job, kubernetes_dryrun, parse_toleration
from tests.k8s_schemas import checkov_failures, template_as_pod, validate_core, validate_volcano

COMPONENT = "components/barlowtwins.py"


def command(app: specs.AppDef) -> str:
    role = app.roles[0]
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    return role.args[1]


def option(text: str, name: str) -> str:
    return text.split(f"{name} ")[1].split()[0]


def test_component_passes_torchx_validation():
    assert validate(COMPONENT, "train") == []


def test_registered_with_the_builtins_kept():
    components = get_components()
    assert {"barlowtwins.train", "barlowtwins.evaluate", "dist.ddp"} <= set(components)


def test_evaluate_component_runs_barlow_evaluate_like_training():
    assert validate(COMPONENT, "evaluate") == []
    app = evaluate("specs/imagenet-linear.yaml", "eval.mode=finetune", nnodes="2", h="gpu_8xh100")
    text = command(app)
    assert "-m service evaluate specs/imagenet-linear.yaml --set eval.mode=finetune" in text
    assert app.roles[0].name == "evaluator" and app.roles[0].num_replicas == 2
    assert option(text, "--nproc_per_node") == "8"


def test_submit_picks_the_evaluate_component_for_an_evaluation_spec(capsys):
    assert main(["submit", "specs/imagenet-linear.yaml", "--scheduler", "kubernetes", "--dryrun", "--gpu", "1"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    validate_volcano(job)
    assert "-m service evaluate specs/imagenet-linear.yaml" in \
        job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]["command"][2]
    assert main(["submit", "specs/imagenet-linear.yaml", "--scheduler", "kubernetes", "--dryrun",
                 "--set", "eval.mdoe=knn"]) == 2
    assert "did you mean 'mode'" in capsys.readouterr().err


def test_single_node_cpu_job():
    app = train("specs/digits.yaml", "optim.epochs=3", "run.output=s3://b/r", nproc_per_node=2)
    role = app.roles[0]
    text = command(app)
    assert text.startswith("torchrun ") and "-m service train specs/digits.yaml" in text
    assert option(text, "--rdzv_backend") == "c10d" and option(text, "--rdzv_endpoint") == "localhost:0"
    assert option(text, "--nnodes") == "1" and option(text, "--nproc_per_node") == "2"
    assert int(option(text, "--max_restarts")) > 0  # torchx's dist.ddp passes none: any failure ends the job
    assert text.endswith("--set optim.epochs=3 --set run.output=s3://b/r")
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


def test_named_resource_sizes_the_node():
    role = train("specs/imagenet-1000ep.yaml", h="gpu_8xh100").roles[0]
    assert role.resource == specs.resource(h="gpu_8xh100")
    assert role.resource.gpu == 8 and role.resource.memMB > 1024 * 1024
    assert option(command(train("s.yaml", h="gpu_8xa100")), "--nproc_per_node") == "8"


@pytest.mark.parametrize("nnodes", ["0", "4:2", "two", "2:", ":4", "1:2:3", ""])
def test_bad_nnodes_are_rejected_clearly(nnodes):
    with pytest.raises(ValueError, match="nnodes"):
        train("specs/digits.yaml", nnodes=nnodes)


def test_nnodes_parsing():
    assert parse_nnodes("3") == (3, 3) and parse_nnodes("2:4") == (2, 4)


def test_more_workers_than_gpus_is_rejected():
    with pytest.raises(ValueError, match="one worker per GPU"):
        train("specs/digits.yaml", gpu=4, nproc_per_node=8)


def rendered(nnodes: str, **options) -> tuple[specs.AppDef, dict]:
    app = train("specs/imagenet-1000ep.yaml", "run.output=s3://bucket/runs/x", nnodes=nnodes, gpu=8)
    _, info = kubernetes_dryrun(app, KubernetesOptions(**options))
    return app, info.request.resource


@pytest.mark.parametrize("nnodes", ["1", "2:4"])
def test_rendered_volcano_job_validates_against_the_crd_and_kubernetes(nnodes):
    app, job = rendered(nnodes, s3_secret="barlow-s3-credentials", image_pull_secrets=["registry"],
                        tolerations=["dedicated=training:NoSchedule"], node_selector={"pool": "h100"})
    validate_volcano(job)
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
        assert container["envFrom"] == [{"secretRef": {"name": "barlow-s3-credentials"}}]
        assert spec["imagePullSecrets"] == [{"name": "registry"}] and spec["nodeSelector"] == {"pool": "h100"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert spec["serviceAccountName"] == "barlow-trainer"


def test_plain_torchx_rendering_also_validates():
    """What `torchx run -s kubernetes` submits without `barlow submit`'s completion."""
    from torchx.runner import get_runner
    from torchx.schedulers.kubernetes_scheduler import sanitize_for_serialization

    app = train("specs/imagenet-1000ep.yaml", nnodes="2:4", gpu=8)
    info = get_runner().dryrun(app, "kubernetes", cfg={"queue": "barlow"}, workspace=None)
    job = sanitize_for_serialization(info.request.resource)
    validate_volcano(job)
    for task in job["spec"]["tasks"]:
        validate_core(template_as_pod(task["template"]))


def test_strict_validation_catches_a_broken_completion():
    app, job = rendered("1")
    job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "lots"
    with pytest.raises(AssertionError):
        validate_volcano(job)


@pytest.mark.parametrize("text, expected", [
    ("nvidia.com/gpu:NoSchedule", {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}),
    ("pool=a100:NoExecute", {"key": "pool", "operator": "Equal", "value": "a100", "effect": "NoExecute"}),
])
def test_tolerations(text, expected):
    assert parse_toleration(text) == expected


def test_bad_toleration_is_rejected():
    with pytest.raises(ValueError, match="key\\[=value\\]:Effect"):
        parse_toleration("gpu:Sometimes")


def test_device_mounts_are_refused_on_kubernetes():
    job = {"spec": {"tasks": [{"template": {"spec": {"volumes": [], "containers": [
        {"resources": {"limits": {}, "requests": {}}, "volumeMounts": [], "securityContext": {"privileged": True}}]}}}]}}
    with pytest.raises(ValueError, match="privileged"):
        complete_volcano_job(job, memory_mb=1024, shm_mb=64, gpu=0, options=KubernetesOptions())


def test_submit_dryrun_prints_the_job(capsys):
    assert main(["submit", "specs/digits.yaml", "--scheduler", "kubernetes", "--dryrun", "--nnodes", "2",
                 "--gpu", "1", "--set", "run.output=s3://bucket/run"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    validate_volcano(job)
    assert "--set run.output=s3://bucket/run" in job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]["command"][2]


def test_submit_validates_the_spec_before_launching(capsys):
    assert main(["submit", "specs/digits.yaml", "--scheduler", "kubernetes", "--dryrun", "--set",
                 "optim.lr_weight=1"]) == 2
    assert "did you mean 'lr_weights'" in capsys.readouterr().err


# checkov's findings that do not apply to a batch training job, each with the reason
CHECKOV_SKIPS = {
    "CKV_K8S_8": "liveness probe: a training worker is a batch process; torchrun's agent watches its workers",
    "CKV_K8S_9": "readiness probe: the pods serve no traffic",
    "CKV_K8S_43": "image digest: the image is a parameter of the job; pin a digest with --image REPO@sha256:...",
    "CKV_K8S_14": "image tag: the default tag is a placeholder, the job's image is a parameter",
    "CKV_K8S_40": "high UID: the training image's user is 1000, as the Dockerfile sets it",
    "CKV_K8S_35": "secrets as files: the AWS credential chain reads these variables; IRSA needs no secret at all",
}


@pytest.mark.slow
def test_rendered_pod_templates_pass_checkov():
    _, job = rendered("2:4", s3_secret="barlow-s3-credentials")
    pods = []
    for task in job["spec"]["tasks"]:
        pod = template_as_pod(task["template"])
        pod["metadata"]["namespace"] = "barlow"
        pods.append(pod)
    policy = yaml.safe_load((Path(__file__).parents[1] / "k8s" / "networkpolicy-training.yaml").read_text())
    failures = checkov_failures([*pods, policy], skip={})
    assert sorted(set(failures) - set(CHECKOV_SKIPS)) == []


def test_submit_checks_the_batch_against_the_largest_world(capsys):
    assert main(["submit", "specs/digits.yaml", "--scheduler", "kubernetes", "--dryrun", "--nnodes", "1:2",
                 "--gpu", "8", "--set", "optim.batch_size=8"]) == 2
    assert "smaller than the 16 workers" in capsys.readouterr().err
