"""The pods of a rendered Volcano Job or JobSet, run as containers with podman: what a cluster's kubelet and the
controllers would do.

Why `podman run` and not `podman kube play`: podman 4.3.1's kube play drops what these pods rely on. An emptyDir
becomes a named volume on the host's disk, shared by every pod that names it (`tmp`, `dshm`); `medium: Memory`
and `sizeLimit` are ignored and /dev/shm is left root-owned, unwritable by the pods' user 1000; `runAsNonRoot`,
`fsGroup` and `subdomain` are ignored; and a Secret it plays cannot be read by a pod. So each pod is translated,
field by field, into one `podman run` (`_pod`, for both schedulers), and a field the translation does not know
fails the test rather than being dropped, as does a Job or JobSet field the runner does not act on.

One translation of a pod: its template's spec and metadata, plus the labels, annotations and environment its
controllers add, as the kubelet would run it:
- labels as `--label`, annotations as `--annotation` (a test reads them back with `podman inspect`); a label the
  API server would refuse (a value over 63 characters, or not a label value's characters) fails the test;
- environment: the keys of `envFrom`'s Secrets (podman secrets delivered as variables), then `env` in order, each
  `value` with its `$(VAR)` references expanded against the variables before it, each `valueFrom.fieldRef` read
  from the pod's own metadata (the downward API: metadata.name, metadata.namespace, metadata.labels['K'],
  metadata.annotations['K']; a key the pod lacks fails the test, where a cluster would give an empty value); any
  other valueFrom fails the test;
- command and args with `$(VAR)` expanded against the container's whole environment as the kubelet does
  (kubernetes third_party/forked/golang/expansion: `$$` is a `$`, an undefined `$(VAR)` stays as written; bash's
  `${VAR}` is not a reference);
- names (`_dns`), as the kubelet and a cluster's DNS give them: the host name; the pod's FQDN
  `<host>.<subdomain>.<namespace>.svc.cluster.local` first in its own /etc/hosts, as the kubelet writes it, so that
  socket.getfqdn() returns it (torchrun's rank-0 agent publishes getfqdn() as the workers' store address: with a
  bare host name there, the other node's workers cannot reach it, on a cluster as here); the FQDN a network alias
  (the headless Service's DNS record); the namespace's search domains with ndots 5, so that `<host>.<subdomain>`
  resolves as on a cluster. Each pod gets a static address (never one of a deleted pod) so that /etc/hosts can
  name it. Unlike a cluster's DNS, podman's also answers a container's name: a JobSet pod's is its name with a
  random suffix (so a bare host name does not resolve, as on a cluster), but a Volcano pod's name is its host name.
Not given: the service-link variables (KUBERNETES_SERVICE_HOST, ...), the API token (both jobs set
automountServiceAccountToken false), a pod IP in the environment.

What Volcano adds to every pod (`volcano_pods`), as its plugins do (batch.volcano.sh `env` and `svc`):
- env plugin: VK_TASK_INDEX and VC_TASK_INDEX, the pod's index within its task (each task has one replica: 0);
- svc plugin: VC_<TASK>_HOSTS (the task's pods' host names, `<job>-<task>-<index>.<job>`) and VC_<TASK>_NUM for
  every task of the job; the pod's hostname is its name and its subdomain the job's, which a headless Service
  makes resolvable (as above).
The pods carry their templates' labels and annotations, not Volcano's own (volcano.sh/job-name, ...).

What JobSet v0.12.0 and the indexed batch Job give every pod (`jobset_pods`); Kueue's admission is played by the
caller, which unsuspends the JobSet (spec.suspend false) as an admitted workload is (Kueue also merges its
ResourceFlavor's node labels and tolerations into the pods: scheduling only, none here):
- JobSet (pkg/controllers/jobset_controller.go, labelAndAnnotateObject), as labels and as annotations both:
  jobset.sigs.k8s.io/jobset-name, jobset-uid (a stand-in UUID here, the same for every attempt),
  replicatedjob-name, replicatedjob-replicas, global-replicas, job-index, job-key (SHA-1 of `<namespace>/<job>`),
  job-global-index, group-name (the API's default `default`), group-replicas, job-group-index, restart-attempt
  (the JobSet's status.restarts: the `restart_attempt` argument), and with spec.coordinator,
  jobset.sigs.k8s.io/coordinator = `<jobset>-<coordinator.replicatedJob>-<jobIndex>-<podIndex>.<subdomain>`; the
  subdomain, spec.network.subdomain or the JobSet's name, on every pod (a headless Service of that name makes
  `<host>.<subdomain>` resolvable). JobSet's pod webhook labels the pod jobset.sigs.k8s.io/priority with its
  priority: 0, what the API server's Priority admission gives a pod without a priorityClassName where no
  PriorityClass is the global default (a priorityClassName fails the test). Not modelled: job-restart-attempt (the
  RestartJob feature gate, off by default), exclusive placement (its annotation fails the test).
  The Job of replicated job `rj`, index j, is `<jobset>-<rj>-<j>` (placement.GenJobName).
- The API server's Job defaulting: labels batch.kubernetes.io/job-name, job-name, batch.kubernetes.io/controller-uid
  and controller-uid (a stand-in UUID, new for every attempt's Job).
- The Job controller (pkg/controller/job, Indexed completion): pod i's host name `<job>-<i>`; the annotation and
  (PodIndexLabel, on by default since 1.28) the label batch.kubernetes.io/job-completion-index=i; the variable
  JOB_COMPLETION_INDEX, appended to each container's env unless it has one, read by the downward API from that
  label. The real pod's name is `<job>-<i>-` and five random characters (generateName): so is the container's
  here, so that nothing can take the pod's name for its host name.
`job_failure` and `jobset_failure_action` say what the Job controller and the JobSet controller decide when a pod
fails, from the rendered policies.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from tests.support.container_engine import engine

POD_FIELDS = {"containers", "restartPolicy", "volumes", "securityContext", "serviceAccountName", "nodeSelector",
              "tolerations", "imagePullSecrets", "automountServiceAccountToken"}
# what only a scheduler or the API server acts on: no container sees it (there is no API server here)
SCHEDULING_FIELDS = {"serviceAccountName", "nodeSelector", "tolerations", "imagePullSecrets",
                     "automountServiceAccountToken"}
CONTAINER_FIELDS = {"name", "image", "command", "args", "env", "envFrom", "ports", "resources", "securityContext",
                    "volumeMounts"}
TEMPLATE_METADATA_FIELDS = {"labels", "annotations"}
# A Volcano Job: the fields `volcano_pods` and the test's restart act on, or that only Volcano's scheduler reads
VOLCANO_JOB_FIELDS = {"schedulerName", "queue", "priorityClassName", "minAvailable", "maxRetry", "plugins", "tasks"}
VOLCANO_TASK_FIELDS = {"name", "replicas", "minAvailable", "maxRetry", "policies", "template"}
VOLCANO_PLUGINS = {"env": [], "svc": ["--publish-not-ready-addresses"]}  # what volcano_env models (DNS: podman's)
# A JobSet (jobset.x-k8s.io/v1alpha2) and its batch/v1 Jobs: what `jobset_pods`, `job_failure` and
# `jobset_failure_action` act on
JOBSET_FIELDS = {"apiVersion", "kind", "metadata", "spec"}
JOBSET_METADATA_FIELDS = {"name", "namespace", "labels"}
JOBSET_SPEC_FIELDS = {"suspend", "network", "coordinator", "failurePolicy", "replicatedJobs"}
JOBSET_NETWORK_FIELDS = {"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"}
COORDINATOR_FIELDS = {"replicatedJob", "jobIndex", "podIndex"}
FAILURE_POLICY_FIELDS = {"maxRestarts", "restartStrategy", "rules"}
FAILURE_RULE_FIELDS = {"name", "action", "onJobFailureReasons", "onJobFailureMessagePatterns", "targetReplicatedJobs"}
REPLICATED_JOB_FIELDS = {"name", "replicas", "groupName", "template"}
JOB_TEMPLATE_FIELDS = {"metadata", "spec"}
JOB_FIELDS = {"parallelism", "completions", "completionMode", "backoffLimit", "podFailurePolicy", "template"}
POD_FAILURE_RULE_FIELDS = {"action", "onExitCodes", "onPodConditions"}

JOBSET = "jobset.sigs.k8s.io/"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
# JobSet's default action for a failed Job no rule matches (jobset pkg/controllers/failure_policy.go)
DEFAULT_JOBSET_FAILURE_ACTION = "RestartJobSet"
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_FIELD_REF = re.compile(r"metadata\.(labels|annotations)\['([^']+)'\]")
CLUSTER_DOMAIN = "cluster.local"
_addresses: dict[str, Iterator[str]] = {}  # the next free addresses of each podman network


@dataclass
class Pod:
    name: str  # the pod's name: its container's
    host: str
    container: str  # the name of the pod's (one) container
    namespace: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    run_arguments: list[str] = field(default_factory=list)  # `podman run ...` without "run"


def _mebibytes(quantity: str) -> int:
    match = re.fullmatch(r"([0-9]+)Mi", quantity)
    assert match, f"quantity {quantity!r}: the scheduler writes memory in Mi"
    return int(match.group(1))


def expand(text: str, variables: dict[str, str]) -> str:
    """`text` with its `$(VAR)` references expanded as the kubelet does (kubernetes
    third_party/forked/golang/expansion/expand.go): `$$` is an escaped `$`, `$(VAR)` of a defined VAR its value,
    of an undefined one left as written; a `$` before anything else stays."""
    out, cursor = [], 0
    while cursor < len(text):
        char = text[cursor]
        if char != "$" or cursor + 1 == len(text):
            out.append(char)
            cursor += 1
            continue
        following = text[cursor + 1]
        if following == "$":
            out.append("$")
            cursor += 2
        elif following == "(" and ")" in text[cursor + 2:]:
            end = text.index(")", cursor + 2)
            name = text[cursor + 2:end]
            out.append(variables.get(name, f"$({name})"))
            cursor = end + 1
        else:  # `$(` without a `)`, or `$` and another character: both kept
            out.append("$" + following)
            cursor += 2
    return "".join(out)


def _field_ref(path: str, pod: Pod) -> str:
    """The downward API's value of `path` for `pod`."""
    if path == "metadata.name":
        return pod.name
    if path == "metadata.namespace":
        return pod.namespace
    match = _FIELD_REF.fullmatch(path)
    assert match, f"fieldRef {path!r} is not translated (metadata.name, namespace, labels['K'], annotations['K'])"
    kind, key = match.groups()
    found = pod.labels if kind == "labels" else pod.annotations
    assert key in found, (f"pod {pod.name} has no {kind[:-1]} {key!r} (its fieldRef {path} would be empty on a "
                          f"cluster): the runner does not give it, or the pod does not get it")
    return found[key]


def _check_labels(labels: dict[str, str]) -> None:
    """What the API server refuses in a pod's labels (k8s.io/apimachinery validation.IsValidLabelValue)."""
    for key, value in labels.items():
        assert len(value) <= 63 and _LABEL_VALUE.fullmatch(value), \
            f"label {key}={value!r} ({len(value)} characters): the API server refuses a label value over 63 " \
            "characters or with other characters than alphanumerics, '-', '_' and '.' (JobSet's webhook refuses " \
            "the JobSet itself when its coordinator label would be: validateCoordinatorLabelValue)"


def _pod(pod: Pod, template: dict, extra_env: list[dict], subdomain: str, network: str,
         secrets: dict[str, dict[str, str]], max_cpus: int) -> Pod:
    """`pod` (its name, host and metadata, what the controllers add included) with the `podman run` arguments of
    the pod template `template`, `extra_env` appended to its container's env by the controllers."""
    metadata = template.get("metadata") or {}
    assert set(metadata) <= TEMPLATE_METADATA_FIELDS, f"pod template metadata not translated: " \
        f"{set(metadata) - TEMPLATE_METADATA_FIELDS}"
    spec = template["spec"]
    assert set(spec) <= POD_FIELDS, f"pod fields not translated: {set(spec) - POD_FIELDS}"
    assert spec["restartPolicy"] == "Never"
    (container,) = spec["containers"]
    untranslated = set(container) - CONTAINER_FIELDS
    assert not untranslated, f"container fields not translated: {untranslated}"
    assert container["name"] == pod.container
    _check_labels(pod.labels)
    arguments = ["-d", "--name", pod.name, "--restart", "no", *_dns(pod, subdomain, network)]
    arguments += [part for key, value in pod.labels.items() for part in ("--label", f"{key}={value}")]
    arguments += [part for key, value in pod.annotations.items() for part in ("--annotation", f"{key}={value}")]
    arguments += _security(spec.get("securityContext", {}), container.get("securityContext", {}))
    arguments += _volumes(spec["volumes"], container["volumeMounts"])
    arguments += _resources(container["resources"], max_cpus)
    environment: dict[str, str] = {}  # what the container sees, in the kubelet's order
    for source in container.get("envFrom", []):
        assert set(source) == {"secretRef"}, f"envFrom {source} is not a Secret"
        secret = source["secretRef"]["name"]
        for key in secrets[secret]:
            arguments += ["--secret", f"{podman_secret_name(secret, key)},type=env,target={key}"]
        environment.update(secrets[secret])
    from_secrets = set(environment)
    declared = [*container.get("env", []), *extra_env]
    names = [item["name"] for item in declared]
    assert len(names) == len(set(names)), f"a variable declared twice: {names}"
    assert not from_secrets & set(names), f"variables both in env and a Secret: {from_secrets & set(names)}"
    for item in declared:
        if "valueFrom" in item:
            source = item["valueFrom"]
            assert set(item) == {"name", "valueFrom"} and set(source) == {"fieldRef"}, \
                f"env {item['name']}: only the downward API's fieldRef is translated, not {source}"
            environment[item["name"]] = _field_ref(source["fieldRef"]["fieldPath"], pod)
        else:
            assert set(item) <= {"name", "value"}, f"env item not translated: {item}"
            environment[item["name"]] = expand(item.get("value", ""), environment)
    arguments += [part for name in names for part in ("-e", f"{name}={environment[name]}")]
    # ports need no publishing: pods reach each other's ports on the network, as on a cluster's pod network
    entrypoint, *rest = [expand(part, environment) for part in [*container["command"], *container.get("args", [])]]
    arguments += ["--entrypoint", entrypoint, container["image"], *rest]
    pod.run_arguments = arguments
    return pod


def _dns(pod: Pod, subdomain: str, network: str) -> list[str]:
    """The pod's names as the kubelet and a cluster's DNS give them (ClusterFirst): its host name; its FQDN
    `<host>.<subdomain>.<namespace>.svc.cluster.local` first in its own /etc/hosts (so that socket.getfqdn() gives
    it: torchrun's rank-0 agent publishes that as the workers' store address) and known to the network's DNS (the
    headless Service's record); the namespace's search domains, with ndots 5, so that `<host>.<subdomain>` resolves
    as on a cluster. A static address, so that /etc/hosts can name it before the container starts."""
    if network not in _addresses:
        subnet = engine("network", "inspect", network, "--format", "{{range .Subnets}}{{.Subnet}}{{end}}")
        gateway = engine("network", "inspect", network, "--format", "{{range .Subnets}}{{.Gateway}}{{end}}")
        hosts = ipaddress.ip_network(subnet.stdout.strip()).hosts()
        _addresses[network] = (str(a) for a in itertools.islice(hosts, 9, None) if str(a) != gateway.stdout.strip())
    address = next(_addresses[network])  # never one of a deleted pod: a new pod has a new address, as on a cluster
    fqdn = f"{pod.host}.{subdomain}.{pod.namespace}.svc.{CLUSTER_DOMAIN}"
    search = [f"{pod.namespace}.svc.{CLUSTER_DOMAIN}", f"svc.{CLUSTER_DOMAIN}", CLUSTER_DOMAIN]
    return ["--hostname", pod.host, "--network", network, "--ip", address, "--add-host", f"{fqdn}:{address}",
            "--network-alias", fqdn, *[part for domain in search for part in ("--dns-search", domain)],
            "--dns-option", "ndots:5"]


def volcano_env(job: dict) -> dict[str, str]:
    """What Volcano's svc plugin gives every pod of `job`."""
    name = job["metadata"]["name"]
    env = {}
    for task in job["spec"]["tasks"]:
        key = re.sub(r"[^A-Z0-9]", "_", task["name"].upper())
        env[f"VC_{key}_HOSTS"] = ",".join(f"{name}-{task['name']}-{i}.{name}" for i in range(task["replicas"]))
        env[f"VC_{key}_NUM"] = str(task["replicas"])
    return env


def volcano_pods(job: dict, network: str, secrets: dict[str, dict[str, str]], max_cpus: int,
                 namespace: str = "barlow") -> list[Pod]:
    """One podman run per task (each has one replica). `secrets`: the cluster's Secrets by name (their keys and
    values; each key becomes a podman secret delivered as an environment variable, as envFrom does)."""
    assert set(job["spec"]) <= VOLCANO_JOB_FIELDS, f"Volcano Job fields not acted on: " \
        f"{set(job['spec']) - VOLCANO_JOB_FIELDS}"
    plugins = job["spec"].get("plugins", {})
    assert all(plugins[name] == VOLCANO_PLUGINS.get(name) for name in plugins), \
        f"Volcano plugins not modelled: {plugins}"
    job_name = job["metadata"]["name"]
    extra_env = [{"name": key, "value": value} for key, value in
                 {**volcano_env(job), "VK_TASK_INDEX": "0", "VC_TASK_INDEX": "0"}.items()]
    result = []
    for task in job["spec"]["tasks"]:
        assert set(task) <= VOLCANO_TASK_FIELDS, f"Volcano task fields not acted on: {set(task) - VOLCANO_TASK_FIELDS}"
        assert task["replicas"] == 1
        pod_name = f"{job_name}-{task['name']}-0"
        metadata = task["template"].get("metadata") or {}
        pod = Pod(pod_name, pod_name, task["template"]["spec"]["containers"][0]["name"], namespace,
                  dict(metadata.get("labels") or {}), dict(metadata.get("annotations") or {}))
        result.append(_pod(pod, task["template"], extra_env, job_name, network, secrets, max_cpus))
    return result


def _known(fields: Iterable[str], known: set[str], what: str) -> None:
    unknown = set(fields) - known
    assert not unknown, f"{what} fields the runner does not act on: {sorted(unknown)}"


def check_jobset(jobset: dict) -> None:
    """Every field of `jobset` is one the runner acts on, with the values it can run: Indexed Jobs of
    parallelism = completions pods that fail their Job at the first failed pod, DNS host names."""
    _known(jobset, JOBSET_FIELDS, "JobSet")
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
    _known(jobset["metadata"], JOBSET_METADATA_FIELDS, "JobSet metadata")
    spec = jobset["spec"]
    _known(spec, JOBSET_SPEC_FIELDS, "JobSet spec")
    _known(spec.get("network") or {}, JOBSET_NETWORK_FIELDS, "JobSet network")
    assert (spec.get("network") or {}).get("enableDNSHostnames"), "without DNS host names no pod finds another"
    _known(spec.get("coordinator") or {}, COORDINATOR_FIELDS, "JobSet coordinator")
    policy = spec.get("failurePolicy") or {}
    _known(policy, FAILURE_POLICY_FIELDS, "JobSet failurePolicy")
    for rule in policy.get("rules", []):
        _known(rule, FAILURE_RULE_FIELDS, "JobSet failurePolicy rule")
    for replicated in spec["replicatedJobs"]:
        _known(replicated, REPLICATED_JOB_FIELDS, "replicatedJob")
        _known(replicated["template"], JOB_TEMPLATE_FIELDS, "replicatedJob template")
        job_metadata = replicated["template"].get("metadata") or {}
        _known(job_metadata, TEMPLATE_METADATA_FIELDS, "Job template metadata")
        job = replicated["template"]["spec"]
        _known(job, JOB_FIELDS, "Job")
        assert job["completionMode"] == "Indexed", "pod host names and JOB_COMPLETION_INDEX need Indexed Jobs"
        assert job["parallelism"] == job["completions"], "every pod of the Job runs at once"
        assert job["backoffLimit"] == 0, "a failed pod fails its Job (the runner recreates no single pod)"
        for rule in (job.get("podFailurePolicy") or {"rules": []})["rules"]:
            _known(rule, POD_FAILURE_RULE_FIELDS, "podFailurePolicy rule")
        for metadata in (job_metadata, replicated["template"]["spec"]["template"].get("metadata") or {}):
            steering = [key for key in metadata.get("annotations") or {} if key.startswith(JOBSET)]
            assert not steering, f"JobSet annotations the runner does not act on (exclusive placement?): {steering}"


def jobset_pods(jobset: dict, network: str, secrets: dict[str, dict[str, str]], max_cpus: int,
                restart_attempt: int = 0, namespace: str = "barlow") -> list[Pod]:
    """The pods of an admitted (unsuspended) JobSet's attempt `restart_attempt` (its status.restarts), with what
    JobSet, the API server and the Job controller give them (the module docstring), coordinator first if any.
    `secrets` as for `volcano_pods`; `namespace`: the one the JobSet is created in (the `namespace` run option)."""
    check_jobset(jobset)
    spec = jobset["spec"]
    assert not spec.get("suspend"), "a suspended JobSet has no pods: Kueue admits it by setting spec.suspend false"
    name = jobset["metadata"]["name"]
    subdomain = (spec.get("network") or {}).get("subdomain") or name
    jobset_uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"jobset/{namespace}/{name}"))
    replicated_jobs = spec["replicatedJobs"]
    ours: dict[str, str] = {}
    if spec.get("coordinator"):
        coordinator = spec["coordinator"]
        ours[f"{JOBSET}coordinator"] = (f"{name}-{coordinator['replicatedJob']}-{coordinator.get('jobIndex', 0)}-"
                                        f"{coordinator.get('podIndex', 0)}.{subdomain}")
    jobs = [(replicated, replicated.get("groupName", "default"), job_index)
            for replicated in replicated_jobs for job_index in range(replicated["replicas"])]
    result = []
    for global_index, (replicated, group, job_index) in enumerate(jobs):
        job_name = f"{name}-{replicated['name']}-{job_index}"
        in_group = [job for job in jobs if job[1] == group]
        added = {
            f"{JOBSET}jobset-name": name, f"{JOBSET}jobset-uid": jobset_uid,
            f"{JOBSET}replicatedjob-name": replicated["name"], f"{JOBSET}restart-attempt": str(restart_attempt),
            f"{JOBSET}replicatedjob-replicas": str(replicated["replicas"]),
            f"{JOBSET}global-replicas": str(len(jobs)), f"{JOBSET}job-index": str(job_index),
            f"{JOBSET}job-key": hashlib.sha1(f"{namespace}/{job_name}".encode()).hexdigest(),
            f"{JOBSET}job-global-index": str(global_index), f"{JOBSET}group-name": group,
            f"{JOBSET}group-replicas": str(len(in_group)),
            f"{JOBSET}job-group-index": str(in_group.index((replicated, group, job_index))), **ours}
        job_uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"job/{namespace}/{job_name}/{restart_attempt}"))
        defaulted = {"batch.kubernetes.io/controller-uid": job_uid, "batch.kubernetes.io/job-name": job_name,
                     "controller-uid": job_uid, "job-name": job_name}
        job = replicated["template"]["spec"]
        template = job["template"]
        metadata = template.get("metadata") or {}
        (container,) = template["spec"]["containers"]
        # the Job controller adds JOB_COMPLETION_INDEX only to a container without it
        index_env = [] if any(item["name"] == "JOB_COMPLETION_INDEX" for item in container.get("env", [])) else [
            {"name": "JOB_COMPLETION_INDEX",
             "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{COMPLETION_INDEX}']"}}}]
        for index in range(job["parallelism"]):
            host = f"{job_name}-{index}"
            pod = Pod(f"{host}-{uuid.uuid4().hex[:5]}", host, container["name"], namespace,
                      labels={**(metadata.get("labels") or {}), **defaulted, **added, COMPLETION_INDEX: str(index),
                              f"{JOBSET}priority": "0"},
                      annotations={**(metadata.get("annotations") or {}), **added, COMPLETION_INDEX: str(index)})
            result.append(_pod(pod, template, index_env, subdomain, network, secrets, max_cpus))
    if ours:
        coordinator_host = ours[f"{JOBSET}coordinator"].removesuffix(f".{subdomain}")
        assert coordinator_host in [pod.host for pod in result], f"no pod is the coordinator {coordinator_host}"
        result.sort(key=lambda pod: pod.host != coordinator_host)
    return result


def job_failure(job: dict, pod: Pod, exit_code: int, conditions: Iterable[str] = ()) -> tuple[str, str]:
    """The failure condition (reason, message) of the Job `job` (its spec) when its pod `pod` fails with
    `exit_code` and the pod conditions `conditions` (types whose status is True): the first rule of its
    podFailurePolicy that matches (kubernetes pkg/controller/job/pod_failure_policy.go, its messages verbatim),
    else its backoffLimit (0: the first counted failure fails it)."""
    conditions = set(conditions)
    for index, rule in enumerate((job.get("podFailurePolicy") or {"rules": []})["rules"]):
        action = rule["action"]
        assert action in ("FailJob", "Count"), f"podFailurePolicy action {action} is not modelled"
        if "onExitCodes" in rule:
            codes = rule["onExitCodes"]
            assert set(codes) <= {"containerName", "operator", "values"}
            assert codes["operator"] in ("In", "NotIn")
            matched = (codes.get("containerName") in (None, pod.container) and exit_code != 0
                       and (exit_code in codes["values"]) == (codes["operator"] == "In"))
            message = (f"Container {pod.container} for pod {pod.namespace}/{pod.name} failed with exit code "
                       f"{exit_code} matching {action} rule at index {index}")
        else:
            patterns = rule["onPodConditions"]
            assert all(set(p) <= {"type", "status"} for p in patterns)
            found = [p["type"] for p in patterns if p["type"] in conditions and p.get("status", "True") == "True"]
            matched = bool(found)
            message = f"Pod {pod.namespace}/{pod.name} has condition {found[0] if found else ''} matching {action} " \
                      f"rule at index {index}"
        if matched and action == "FailJob":
            return "PodFailurePolicy", message
        if matched:  # Count: as if no rule matched
            break
    assert job["backoffLimit"] == 0
    return "BackoffLimitExceeded", "Job has reached the specified backoff limit"


def jobset_failure_action(jobset: dict, replicated_job: str, reason: str, message: str) -> str:
    """What the JobSet controller does when its Job of `replicated_job` fails with `reason` and `message`: the
    action of the first failurePolicy rule that applies (jobset pkg/controllers/failure_policy.go: every listed
    reason, message pattern and target must allow the Job), else RestartJobSet; FailJobSet without a policy.
    The patterns are RE2 expressions matched anywhere in the message: Python's `re.search` on these plain ones."""
    policy = jobset["spec"].get("failurePolicy")
    if policy is None:
        return "FailJobSet"
    for rule in policy.get("rules", []):
        _known(rule, FAILURE_RULE_FIELDS, "JobSet failurePolicy rule")
        if rule.get("onJobFailureReasons") and reason not in rule["onJobFailureReasons"]:
            continue
        patterns = rule.get("onJobFailureMessagePatterns")
        if patterns and not any(re.search(pattern, message) for pattern in patterns):
            continue
        if rule.get("targetReplicatedJobs") and replicated_job not in rule["targetReplicatedJobs"]:
            continue
        return rule["action"]
    return DEFAULT_JOBSET_FAILURE_ACTION


def podman_secret_name(secret: str, key: str) -> str:
    return f"{secret}.{key}".lower().replace("_", "-")


def _security(pod: dict, container: dict) -> list[str]:
    arguments = []
    user, group = pod.get("runAsUser"), pod.get("runAsGroup")
    if pod.get("runAsNonRoot") or container.get("runAsNonRoot"):
        assert user not in (None, 0), "runAsNonRoot needs a numeric non-root runAsUser (the kubelet checks it)"
    if user is not None:
        arguments += ["--user", f"{user}:{group if group is not None else user}"]
    if pod.get("fsGroup") is not None:
        arguments += ["--group-add", str(pod["fsGroup"])]
    assert pod.get("seccompProfile", {"type": "RuntimeDefault"}) == {"type": "RuntimeDefault"}  # podman's default
    assert not container.get("privileged")
    if container.get("readOnlyRootFilesystem"):
        arguments += ["--read-only", "--read-only-tmpfs=false"]  # only the volumes below are writable
    if container.get("allowPrivilegeEscalation") is False:
        arguments += ["--security-opt", "no-new-privileges"]
    for capability in container.get("capabilities", {}).get("drop", []):
        arguments += ["--cap-drop", capability]
    assert not container.get("capabilities", {}).get("add")
    return arguments


def _volumes(volumes: list[dict], mounts: list[dict]) -> list[str]:
    by_name = {volume["name"]: volume for volume in volumes}
    arguments = []
    for mount in mounts:
        volume = by_name[mount["name"]]
        assert set(volume) == {"name", "emptyDir"}, f"volume {volume} is not an emptyDir (no claims in this test)"
        empty_dir = volume["emptyDir"]
        if mount["mountPath"] == "/dev/shm":
            assert empty_dir.get("medium") == "Memory"
            arguments += ["--shm-size", f"{_mebibytes(empty_dir['sizeLimit'])}m"]
        else:  # the pod's own scratch space: private to it, empty at start, writable by its user
            size = f",size={_mebibytes(empty_dir['sizeLimit'])}m" if "sizeLimit" in empty_dir else ""
            arguments += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777{size}"]
    return arguments


def _resources(resources: dict, max_cpus: int) -> list[str]:
    limits = resources.get("limits", {})
    assert "nvidia.com/gpu" not in limits, "CPU workers only"
    arguments = []
    if "memory" in limits:
        arguments += ["--memory", f"{_mebibytes(limits['memory'])}m"]
    if "cpu" in limits:
        millicpus = int(limits["cpu"].removesuffix("m"))
        arguments += ["--cpus", str(min(millicpus / 1000, max_cpus))]  # podman refuses more than the machine has
    return arguments
