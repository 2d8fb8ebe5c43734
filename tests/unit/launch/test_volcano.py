"""service/launch/volcano.py and pods.py: the project's `kubernetes` scheduler: the Volcano Job it completes (for 1
and 2:4 nodes, against the strict Volcano CRD and the Kubernetes schemas), tolerations, outputs and mounts pods cannot
have, the run options of torchx 0.7 and 0.8; and where a job's run is, read from the Job the API server returns (the API
call stubbed: there is no cluster here), a shipped spec that is no spec being one error."""

from __future__ import annotations

import json

import pytest
from torchx import specs
from torchx.runner import get_runner

from components.barlowtwins import parse_nnodes, train
from service.errors import JobError, SpecError
from service.launch.job_spec import SPEC_ENV
from service.launch.pods import parse_toleration
from service.launch.torchx_api import SubmissionError, run_option
from service.launch.volcano import BarlowKubernetesScheduler, complete_volcano_job
from tests.support.k8s_schemas import template_as_pod, validate_core, validate_volcano
from tests.support.progress import VolcanoApi, rendered_job


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


def test_run_location_of_a_rendered_volcano_job(monkeypatch):
    api = VolcanoApi(rendered_job("run.output=s3://bucket/runs/k", "storage.endpoint_url=http://minio:9000",
                                  "storage.region=eu-west-1"))
    monkeypatch.setattr(BarlowKubernetesScheduler, "_custom_objects_api", lambda self: api)
    location = BarlowKubernetesScheduler("torchx").run_location("barlow:barlowtwins-x1")
    assert location is not None
    run_url, storage = location
    assert run_url == "s3://bucket/runs/k"
    assert (storage.endpoint_url, storage.region) == ("http://minio:9000", "eu-west-1")
    assert api.calls == [{"group": "batch.volcano.sh", "version": "v1alpha1", "namespace": "barlow", "plural": "jobs",
                          "name": "barlowtwins-x1"}]
    api.job = json.loads(json.dumps(rendered_job("run.output=s3://b/r", spec="image:specs/digits.yaml")))
    assert BarlowKubernetesScheduler("torchx").run_location("barlow:barlowtwins-x2") is None  # no BARLOW_SPEC


class Api:
    def __init__(self, spec: str):
        self.job = {"spec": {"tasks": [{"template": {"spec": {"containers": [
            {"env": [{"name": SPEC_ENV, "value": spec}]}]}}}]}}

    def get_namespaced_custom_object(self, **_):
        return self.job


@pytest.mark.parametrize("spec, error, why", [
    ("run: " + "[" * 5_000, SpecError, "nests too deeply"),
    ("- 1\n", JobError, "not a spec with a run.output"),
    ("run: {output: [1]}", JobError, "not a spec with a run.output"),
])
def test_a_jobs_shipped_spec_that_is_no_spec_is_one_error(monkeypatch, spec, error, why):
    """Before: yaml.safe_load's RecursionError, and TypeError or KeyError tracebacks."""
    monkeypatch.setattr(BarlowKubernetesScheduler, "_custom_objects_api", lambda self: Api(spec))
    with pytest.raises(error, match=why):
        BarlowKubernetesScheduler("torchx").run_location("barlow:barlowtwins-x1")
