"""The manifests under k8s/ (a kustomize base, one overlay per scheduler) and .torchxconfig: valid objects, complete
kustomizations, overlays that build to their scheduler's objects and no other's, least privilege per scheduler,
Kueue's objects naming each other, no committed secrets, settings the schedulers accept; and validators that do
reject mistakes. checkov's findings on the built overlays: tests/integration/test_k8s_manifests.py.

The tests read the overlays as `read_kustomization` (tests/support/k8s_checks.py) resolves their kustomizations
(files, the base, and the patches, which only add Role rules), in process; tests/integration/test_k8s_manifests.py
checks that `kubectl kustomize` builds exactly that, and validates what it builds."""

import configparser
import copy
import re
from pathlib import Path

import pytest
import yaml
from kubernetes.utils import parse_quantity
from torchx.runner.config import apply as apply_torchxconfig
from torchx.schedulers import get_scheduler_factories
from torchx.specs import get_named_resources

from tests.support.k8s_checks import (
    FOLDERS,
    K8S,
    checkov_failures_by_group,
    kustomization_of,
    load_documents,
    read_kustomization,
    volcano_job,
)
from tests.support.k8s_schemas import (
    checkov_failures,
    template_as_pod,
    validate_core,
    validate_custom,
    validate_manifest,
    validate_volcano,
)

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "barlow"
CLUSTER_SCOPED = {"Namespace", "PriorityClass", "Queue", "ClusterQueue", "ResourceFlavor", "WorkloadPriorityClass",
                  "ClusterRole", "ClusterRoleBinding"}
SUBMITTER_ROLE = {"group": "rbac.authorization.k8s.io", "version": "v1", "kind": "Role", "name": "barlow-submitter",
                  "namespace": NAMESPACE}


def _patch_files() -> set[Path]:
    """The files that kustomizations name as patches: JSON patches, not objects (test_patches_only_add_...)."""
    return {(path.parent / patch["path"]).resolve()
            for path in K8S.rglob("kustomization.yaml") for patch in kustomization_of(path.parent).get("patches", [])}


PATCHES = _patch_files()


def _manifest_files() -> list[Path]:
    return sorted(path for path in K8S.rglob("*.yaml") if path.name != "kustomization.yaml" and path not in PATCHES)


def _documents() -> list[tuple[str, dict]]:
    return [(f"{path.relative_to(K8S)}#{index}", document)
            for path in _manifest_files() for index, document in enumerate(load_documents(path))]


DOCUMENTS = _documents()


BUILDS = {name: read_kustomization(folder) for name, folder in FOLDERS.items()}


def _objects(kind: str, documents: list[dict] | None = None) -> list[dict]:
    documents = [document for _, document in DOCUMENTS] if documents is None else documents
    return [document for document in documents if document["kind"] == kind]


def _only(kind: str, documents: list[dict] | None = None) -> dict:
    (found,) = _objects(kind, documents)
    return found


def _group(obj: dict) -> str:
    return obj["apiVersion"].rpartition("/")[0]


@pytest.mark.parametrize("document", [document for _, document in DOCUMENTS], ids=[i for i, _ in DOCUMENTS])
def test_every_manifest_validates(document):
    validate_manifest(document)


def test_the_expected_objects_are_there():
    assert sorted((document["kind"], document["metadata"]["name"]) for _, document in DOCUMENTS) == [
        ("ClusterQueue", "barlow"),
        ("LocalQueue", "barlow"),
        ("Namespace", "barlow"),
        ("NetworkPolicy", "barlow-training"),
        ("PersistentVolumeClaim", "imagenet"),
        ("PriorityClass", "barlow-training"),
        ("Queue", "barlow"),
        ("ResourceFlavor", "default-flavor"),
        ("Role", "barlow-submitter"),
        ("RoleBinding", "barlow-submitter"),
        ("Secret", "barlow-s3-credentials"),
        ("ServiceAccount", "barlow-submitter"),
        ("ServiceAccount", "barlow-trainer"),
        ("WorkloadPriorityClass", "barlow-training"),
    ]


def test_each_kustomization_lists_every_file_of_its_folder_and_nothing_optional():
    assert {path.parent for path in K8S.rglob("kustomization.yaml")} == set(FOLDERS.values()), "a stray kustomization"
    for name, folder in FOLDERS.items():
        kustomization = kustomization_of(folder)
        assert set(kustomization) <= {"apiVersion", "kind", "resources", "patches"}, name
        resources = kustomization["resources"]
        assert len(resources) == len(set(resources)), f"{name}: a resource is listed twice"
        if name != "base":
            assert resources[0] == "../../base", f"{name}: an overlay starts from the base"
        files = [resource for resource in resources if resource != "../../base"]
        for resource in files:
            assert "/" not in resource and (folder / resource).is_file(), f"{name} lists {resource}, not a file of it"
        patches = [patch["path"] for patch in kustomization.get("patches", [])]
        # optional/ is never listed: only the folder's own files and the base are
        assert sorted(files + patches) == sorted(path.name for path in folder.glob("*.yaml")
                                                 if path.name != "kustomization.yaml"), name


def test_patches_only_add_rules_to_the_submitter_role():
    """The files kustomizations name as patches are JSON patches, not objects: test_every_manifest_validates does
    not read them, so each operation is checked here, and its rules validate as a Role's."""
    assert PATCHES == {FOLDERS[name] / "rbac-submitter-rules.yaml" for name in ("volcano", "kueue")}
    for name, folder in FOLDERS.items():
        for patch in kustomization_of(folder).get("patches", []):
            assert set(patch) == {"path", "target"} and patch["target"] == SUBMITTER_ROLE, name
            operations = yaml.safe_load((folder / patch["path"]).read_text())
            assert operations and all(set(operation) == {"op", "path", "value"} for operation in operations), name
            assert {(operation["op"], operation["path"]) for operation in operations} == {("add", "/rules/-")}, name
            role = copy.deepcopy(_only("Role"))
            role["rules"] = [operation["value"] for operation in operations]
            validate_core(role)


# each build's objects (kind, name): the base's, and what each overlay adds to it
BASE_OBJECTS = [("Namespace", "barlow"), ("NetworkPolicy", "barlow-training"), ("PriorityClass", "barlow-training"),
                ("Role", "barlow-submitter"), ("RoleBinding", "barlow-submitter"),
                ("ServiceAccount", "barlow-submitter"), ("ServiceAccount", "barlow-trainer")]
BUILD_OBJECTS = {
    "base": BASE_OBJECTS,
    "volcano": BASE_OBJECTS + [("Queue", "barlow")],
    "kueue": BASE_OBJECTS + [("ClusterQueue", "barlow"), ("LocalQueue", "barlow"), ("ResourceFlavor", "default-flavor"),
                             ("WorkloadPriorityClass", "barlow-training")],
}
# the API groups of each scheduler's queue and jobs: a build holds its own scheduler's objects only
SCHEDULER_GROUPS = {"volcano": {"scheduling.volcano.sh", "batch.volcano.sh"},
                    "kueue": {"kueue.x-k8s.io", "jobset.x-k8s.io"}}


@pytest.mark.parametrize("name", FOLDERS)
def test_each_build_holds_its_schedulers_objects_and_no_other_schedulers(name):
    objects = BUILDS[name]
    assert sorted((obj["kind"], obj["metadata"]["name"]) for obj in objects) == sorted(BUILD_OBJECTS[name])
    groups = {_group(obj) for obj in objects}
    for scheduler, scheduler_groups in SCHEDULER_GROUPS.items():
        if scheduler == name:
            assert groups & scheduler_groups, f"{name}: none of its scheduler's objects"
        else:
            assert not groups & scheduler_groups, f"{name} holds {scheduler}'s objects"


def _verbs(group: str, resource: str, *verbs: str) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for verb in verbs}


# the submitter's rules in each build, as (API group, resource, verb): the base's, and each scheduler's on top
BASE_RULES = (_verbs("", "pods", "get", "list", "watch") | _verbs("", "events", "get", "list", "watch")
              | _verbs("", "pods/log", "get"))
SUBMITTER_RULES = {
    "base": BASE_RULES,
    "volcano": BASE_RULES | _verbs("batch.volcano.sh", "jobs", "create", "get", "list", "watch", "delete")
    | _verbs("batch.volcano.sh", "jobs/status", "get") | _verbs("scheduling.volcano.sh", "podgroups", "get", "list",
                                                                   "watch"),
    "kueue": BASE_RULES | _verbs("jobset.x-k8s.io", "jobsets", "create", "get", "list", "watch", "delete")
    | _verbs("jobset.x-k8s.io", "jobsets/status", "get") | _verbs("kueue.x-k8s.io", "workloads", "get", "list",
                                                                   "watch"),
}
# the API calls each scheduler makes, which its rules must allow: TorchX 0.7.0's kubernetes scheduler (run, list,
# cancel, status, log) for Volcano; the project's jobset scheduler (CustomObjectsApi create/get/list/delete of
# jobsets, CoreV1Api list_namespaced_pod and read_namespaced_pod_log) for Kueue
SCHEDULER_CALLS = {
    "base": set(),
    "volcano": _verbs("batch.volcano.sh", "jobs", "create", "list", "delete")
    | _verbs("batch.volcano.sh", "jobs/status", "get") | _verbs("", "pods/log", "get"),
    "kueue": _verbs("jobset.x-k8s.io", "jobsets", "create", "get", "list", "delete") | _verbs("", "pods", "list")
    | _verbs("", "pods/log", "get"),
}


def _granted(role: dict) -> set[tuple[str, str, str]]:
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, f"resourceNames or URLs in {rule}"
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard {field} in {rule}"
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


@pytest.mark.parametrize("name", FOLDERS)
def test_each_builds_submitter_role_grants_its_schedulers_calls_and_no_more(name):
    granted = _granted(_only("Role", BUILDS[name]))
    assert SCHEDULER_CALLS[name] <= granted
    assert granted == SUBMITTER_RULES[name]


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


def test_namespaced_objects_name_the_namespace_and_cluster_scoped_ones_none():
    # no kustomization sets a namespace: kustomize would also stamp it on the cluster-scoped Queue and ClusterQueue
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


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects these labels."""
    assert set(selector) <= {"matchLabels", "matchExpressions"} and selector, f"unsupported selector {selector}"
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matches = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
                   "Exists": key in labels, "DoesNotExist": key not in labels}[operator]
        if not matches:
            return False
    return True


def _namespace_labels(name: str, labels: dict[str, str] | None = None) -> dict[str, str]:
    # the API server labels every namespace with its own name
    return {**(labels or {}), "kubernetes.io/metadata.name": name}


def test_kueues_objects_name_each_other():
    objects = BUILDS["kueue"]
    local_queue, cluster_queue = _only("LocalQueue", objects), _only("ClusterQueue", objects)
    namespace = _only("Namespace", objects)
    assert local_queue["metadata"]["namespace"] == namespace["metadata"]["name"]
    assert local_queue["spec"]["clusterQueue"] == cluster_queue["metadata"]["name"]
    selector = cluster_queue["spec"]["namespaceSelector"]
    assert _selects(selector, _namespace_labels(namespace["metadata"]["name"], namespace["metadata"]["labels"]))
    assert not _selects(selector, _namespace_labels("default")), "the ClusterQueue takes other namespaces' jobs"
    flavors = {flavor["metadata"]["name"] for flavor in _objects("ResourceFlavor", objects)}
    (group,) = cluster_queue["spec"]["resourceGroups"]
    assert set(group["coveredResources"]) == {"cpu", "memory", "nvidia.com/gpu"}
    for flavor in group["flavors"]:
        assert flavor["name"] in flavors, f"the ClusterQueue names the missing ResourceFlavor {flavor['name']}"
        # Kueue requires each flavor to list the covered resources in the same order
        assert [resource["name"] for resource in flavor["resources"]] == group["coveredResources"]
    assert (_only("WorkloadPriorityClass", objects)["value"]
            == _only("PriorityClass", objects)["value"]), "both schedulers should rank a training job alike"


def test_each_queue_holds_the_readmes_two_node_job():
    """The README's example runs on 2 nodes of gpu_8xh100 at least: a queue smaller than that never starts it
    (Volcano's capability caps the gang; Kueue admits a JobSet only whole)."""
    node = get_named_resources("gpu_8xh100")
    needed = {"cpu": 2 * node.cpu, "memory": parse_quantity(f"{2 * node.memMB}Mi"), "nvidia.com/gpu": 2 * node.gpu}
    capability = _only("Queue", BUILDS["volcano"])["spec"]["capability"]
    (group,) = _only("ClusterQueue", BUILDS["kueue"])["spec"]["resourceGroups"]
    (flavor,) = group["flavors"]
    quota = {resource["name"]: resource["nominalQuota"] for resource in flavor["resources"]}
    for queue, limits in (("Volcano Queue", capability), ("Kueue ClusterQueue", quota)):
        for resource, amount in needed.items():
            assert parse_quantity(limits[resource]) >= amount, f"{queue}: {resource} {limits[resource]} < {amount}"


def test_torchxconfig_parses_and_names_the_objects_of_its_overlay():
    config = configparser.ConfigParser()
    config.read(REPO / ".torchxconfig")
    volcano, kueue = BUILDS["volcano"], BUILDS["kueue"]
    accounts = {account["metadata"]["name"] for account in _objects("ServiceAccount")}
    options = dict(config["kubernetes"])
    assert options["queue"] == _only("Queue", volcano)["metadata"]["name"]
    assert options["namespace"] == _only("Namespace", volcano)["metadata"]["name"]
    assert options["priority_class"] == _only("PriorityClass", volcano)["metadata"]["name"]
    assert options["service_account"] in accounts
    options = dict(config["jobset"])
    local_queue = _only("LocalQueue", kueue)
    assert options["queue"] == local_queue["metadata"]["name"]
    assert options["namespace"] == _only("Namespace", kueue)["metadata"]["name"] == local_queue["metadata"]["namespace"]
    assert options["priority_class"] == _only("WorkloadPriorityClass", kueue)["metadata"]["name"]
    assert options["service_account"] in accounts


def test_torchxconfig_options_are_accepted_by_their_schedulers():
    config = configparser.ConfigParser()
    config.optionxform = str  # torchx reads option names case-sensitively
    config.read(REPO / ".torchxconfig")
    schedulers = get_scheduler_factories()
    assert {"kubernetes", "jobset"} <= set(config.sections())
    for section in config.sections():
        if section == "cli:run":  # `torchx run`'s own defaults
            assert set(config[section]) <= {"scheduler", "workspace"} and config[section]["scheduler"] in schedulers
            continue
        assert section in schedulers, f"[{section}] names no registered TorchX scheduler: {sorted(schedulers)}"
        accepted = {name for name, _ in schedulers[section](session_name="test").run_opts()}
        assert set(config[section]) <= accepted, f"[{section}] has options {section} does not take"
    for scheduler in ("kubernetes", "jobset"):
        cfg: dict = {}
        apply_torchxconfig(scheduler, cfg, dirs=[str(REPO)])
        resolved = schedulers[scheduler](session_name="test").run_opts().resolve(cfg)
        assert resolved["queue"] == "barlow" and resolved["namespace"] == "barlow", scheduler
        assert resolved["priority_class"] == "barlow-training", scheduler


def test_queue_with_a_misspelt_field_is_rejected():
    queue = copy.deepcopy(_only("Queue"))
    queue["spec"]["weigth"] = queue["spec"].pop("weight")
    with pytest.raises(AssertionError, match=r"spec: .*'weigth' was unexpected"):
        validate_volcano(queue)


def test_cluster_queue_with_a_misspelt_field_or_a_namespace_is_rejected():
    queue = copy.deepcopy(_only("ClusterQueue"))
    queue["spec"]["resourceGroups"][0]["flavors"][0]["resources"][0]["nominalQuotas"] = 1
    with pytest.raises(AssertionError, match=r"resources\[0\]: .*'nominalQuotas' was unexpected"):
        validate_custom(queue)
    queue = copy.deepcopy(_only("ClusterQueue"))
    queue["metadata"]["namespace"] = NAMESPACE
    with pytest.raises(AssertionError, match="ClusterQueue is cluster-scoped and has no namespace"):
        validate_custom(queue)


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
