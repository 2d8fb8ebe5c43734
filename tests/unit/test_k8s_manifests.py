"""The manifests under k8s/ and .torchxconfig: valid objects, a complete kustomization, least privilege,
no committed secrets, settings TorchX's kubernetes scheduler accepts; and validators that do reject mistakes.
checkov's findings on the manifests: tests/integration/test_k8s_manifests.py."""

import configparser
import copy
import re
from pathlib import Path

import pytest
import yaml
from torchx.runner.config import apply as apply_torchxconfig
from torchx.schedulers import get_scheduler_factories

from tests.support.k8s_checks import checkov_failures_by_group, volcano_job
from tests.support.k8s_schemas import (
    checkov_failures,
    template_as_pod,
    validate_core,
    validate_manifest,
    validate_volcano,
)

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
NAMESPACE = "barlow"
CLUSTER_SCOPED = {"Namespace", "PriorityClass", "Queue", "ClusterRole", "ClusterRoleBinding"}


def _manifest_files() -> list[Path]:
    return sorted(path for path in K8S.rglob("*.yaml") if path != KUSTOMIZATION)


def _documents() -> list[tuple[str, dict]]:
    return [
        (f"{path.relative_to(K8S)}#{index}", document)
        for path in _manifest_files()
        for index, document in enumerate(yaml.safe_load_all(path.read_text()))
        if document is not None
    ]


DOCUMENTS = _documents()


def _objects(kind: str) -> list[dict]:
    return [document for _, document in DOCUMENTS if document["kind"] == kind]


def _only(kind: str) -> dict:
    (found,) = _objects(kind)
    return found


@pytest.mark.parametrize("document", [document for _, document in DOCUMENTS], ids=[i for i, _ in DOCUMENTS])
def test_every_manifest_validates(document):
    validate_manifest(document)


def test_the_expected_objects_are_there():
    assert sorted((document["kind"], document["metadata"]["name"]) for _, document in DOCUMENTS) == [
        ("Namespace", "barlow"),
        ("NetworkPolicy", "barlow-training"),
        ("PersistentVolumeClaim", "imagenet"),
        ("PriorityClass", "barlow-training"),
        ("Queue", "barlow"),
        ("Role", "barlow-submitter"),
        ("RoleBinding", "barlow-submitter"),
        ("Secret", "barlow-s3-credentials"),
        ("ServiceAccount", "barlow-submitter"),
        ("ServiceAccount", "barlow-trainer"),
    ]


def test_kustomization_lists_every_required_manifest_and_no_optional_one():
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "namespace", "labels"}
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    for resource in resources:
        assert (K8S / resource).is_file(), f"kustomization.yaml lists {resource}, which does not exist"
    required = {str(path.relative_to(K8S)) for path in _manifest_files() if path.parent == K8S}
    assert set(resources) == required


def test_namespaced_objects_name_the_namespace_and_cluster_scoped_ones_none():
    # kustomization.yaml sets no namespace: kustomize would also stamp it on the cluster-scoped Queue (a CRD).
    for ident, document in DOCUMENTS:
        namespace = document["metadata"].get("namespace")
        expected = None if document["kind"] in CLUSTER_SCOPED else NAMESPACE
        assert namespace == expected, ident


def test_secret_template_holds_placeholders_only():
    secret = _only("Secret")
    assert secret["type"] == "Opaque"
    assert "data" not in secret, "base64 data would hide what is committed"
    values = secret["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(values)
    assert set(values) <= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"}
    for key, value in values.items():
        assert re.fullmatch(r"REPLACE_WITH_[A-Z_]+", value), f"{key} holds {value!r}, not a placeholder"


def test_submitter_role_grants_what_torchx_needs_and_no_more():
    rules = _only("Role")["rules"]
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard {field} in {rule}"
    granted = {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    # the calls of torchx's kubernetes scheduler: run, list, cancel, status, log
    needed = {("batch.volcano.sh", "jobs", verb) for verb in ("create", "list", "delete")}
    needed |= {("batch.volcano.sh", "jobs/status", "get"), ("", "pods/log", "get")}
    assert needed <= granted
    assert not {(g, r, v) for g, r, v in granted if r in {"secrets", "pods/exec", "roles", "rolebindings"}}
    assert not {(g, r, v) for g, r, v in granted if v in {"escalate", "bind", "impersonate"}}


def test_nothing_is_granted_cluster_wide():
    assert not _objects("ClusterRole") and not _objects("ClusterRoleBinding")


def test_role_binding_binds_the_role_to_the_ci_service_account():
    binding = _only("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": _only("Role")["metadata"]["name"]
    }
    accounts = {(s["name"], s["namespace"]) for s in binding["subjects"] if s["kind"] == "ServiceAccount"}
    assert accounts == {("barlow-submitter", NAMESPACE)}


def test_service_accounts_do_not_mount_api_tokens():
    for account in _objects("ServiceAccount"):
        assert account["automountServiceAccountToken"] is False, account["metadata"]["name"]


def test_torchxconfig_parses_and_names_the_objects_under_k8s():
    config = configparser.ConfigParser()
    config.read(REPO / ".torchxconfig")
    options = dict(config["kubernetes"])
    assert options["queue"] == _only("Queue")["metadata"]["name"]
    assert options["namespace"] == _only("Namespace")["metadata"]["name"]
    assert options["priority_class"] == _only("PriorityClass")["metadata"]["name"]
    assert options["service_account"] in {account["metadata"]["name"] for account in _objects("ServiceAccount")}


def test_torchxconfig_options_are_accepted_by_their_schedulers():
    config = configparser.ConfigParser()
    config.optionxform = str  # torchx reads option names case-sensitively
    config.read(REPO / ".torchxconfig")
    schedulers = get_scheduler_factories()
    assert "kubernetes" in config.sections()
    for section in config.sections():
        if section == "cli:run":  # `torchx run`'s own defaults
            assert set(config[section]) <= {"scheduler", "workspace"} and config[section]["scheduler"] in schedulers
            continue
        accepted = {name for name, _ in schedulers[section](session_name="test").run_opts()}
        assert set(config[section]) <= accepted, f"[{section}] has options {section} does not take"
    cfg = {}
    apply_torchxconfig("kubernetes", cfg, dirs=[str(REPO)])
    resolved = schedulers["kubernetes"](session_name="test").run_opts().resolve(cfg)
    assert resolved["queue"] == "barlow" and resolved["namespace"] == "barlow"
    assert resolved["priority_class"] == "barlow-training"


def test_queue_with_a_misspelt_field_is_rejected():
    queue = copy.deepcopy(_only("Queue"))
    queue["spec"]["weigth"] = queue["spec"].pop("weight")
    with pytest.raises(AssertionError, match=r"spec: .*'weigth' was unexpected"):
        validate_volcano(queue)


def test_volcano_job_with_a_wrong_type_is_rejected():
    job = volcano_job()
    validate_volcano(job)
    job["spec"]["minAvailable"] = "two"
    with pytest.raises(AssertionError, match=r"spec\.minAvailable: 'two' is not of type 'integer'"):
        validate_volcano(job)


def test_volcano_job_with_a_misspelt_field_in_its_pod_template_is_rejected():
    job = volcano_job()
    job["spec"]["tasks"][1]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(AssertionError, match=r"spec\.tasks\[1\]\.template\.spec\.containers\[0\]: .*'resource'"):
        validate_volcano(job)


def test_volcano_job_with_a_bad_quantity_is_rejected():
    job = volcano_job()
    job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "480 GiB"
    with pytest.raises(AssertionError, match=r"limits\.memory: '480 GiB' does not match"):
        validate_volcano(job)


def test_volcano_job_is_not_mistaken_for_a_core_object():
    with pytest.raises(AssertionError, match="use validate_custom"):
        validate_core(volcano_job())


def test_pod_template_validates_as_a_pod_and_an_unknown_field_is_rejected():
    pod = template_as_pod(volcano_job()["spec"]["tasks"][0]["template"])
    validate_core(pod)
    pod["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(AssertionError, match=r"spec\.containers\[0\]: .*'imagePullPolicyy' was unexpected"):
        validate_core(pod)


def test_checkov_skips_need_a_justification():
    with pytest.raises(ValueError, match="CKV_K8S_16"):
        checkov_failures([], {"CKV_K8S_16": " "})
    with pytest.raises(ValueError, match="CKV_K8S_16"):
        checkov_failures_by_group({"pods": []}, {"pods": {"CKV_K8S_16": " "}})
