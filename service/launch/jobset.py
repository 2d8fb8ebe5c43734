"""The project's `jobset` TorchX scheduler: the same components as a JobSet (jobset.x-k8s.io/v1alpha2), the object
Kubeflow Trainer v2 renders multi-node jobs into and Kueue queues and admits all at once.

Registered under the `torchx.schedulers` entry point as `jobset`: `torchx run -s jobset`, `barlow submit
--scheduler jobset` and the Python Runner render the same object. Its pods are the Volcano job's
(service/launch/pods.py builds both); what differs is around them:

- Shape: one replicated Job per role, named after it, with one Job (replicas 1) of `nnodes` indexed pods
  (parallelism = completions = nnodes). With DNS host names, pod i is `<jobset>-<role>-0-<i>.<jobset>`.
- Rendezvous: torchrun's c10d rendezvous is on the coordinator, the first pod; JobSet annotates every pod with the
  coordinator's stable host name (`spec.coordinator`), which reaches the container as TORCHX_RANK0_HOST (the
  downward API), the variable the components' rendezvous endpoint reads.
- Failures: a failed pod fails its Job at once (backoffLimit 0) and the Job's pod failure policy says why: exit 2
  (a worker stopped on the user's error: service/launch/torchrun.py) or the pod condition DisruptionTarget
  (pre-empted, evicted, its node lost). The JobSet's failurePolicy then fails the JobSet on a user's error without
  a retry, recreates it on a disruption without counting it, and recreates it on any other failure at most
  max_retries times. Every recreation resumes from the run's last checkpoint.
  Why the whole JobSet, and not the lost pod alone while the others wait in torchrun's re-rendezvous: the
  rendezvous store lives in the first pod's torchrun, so losing that pod ends every node's agent anyway; a fixed
  world size cannot go on without the lost node; and the restart strategy BlockingRecreate removes every pod of
  an attempt before the next starts, so no agent of the old attempt joins the new rendezvous (both share the
  job's rendezvous id). Kueue keeps the JobSet admitted through its restarts.
- Elastic sizes (nnodes MIN:MAX) are refused: Kueue admits replicas x parallelism pods at once and a JobSet has no
  size between MIN and MAX to shrink to; Volcano's `kubernetes` scheduler runs elastic jobs.
- Kueue: the run option `queue` names the LocalQueue (label kueue.x-k8s.io/queue-name) and the JobSet is created
  suspended, so nothing starts before the queue admits the whole job. `priority_class` names a Kueue
  WorkloadPriorityClass (label kueue.x-k8s.io/priority-class): it orders the queue and Kueue's preemption without
  giving the pods a priority by which the node scheduler would evict other teams' admitted pods. With `queue=none`
  (a cluster without Kueue) the JobSet starts at once and priority_class is the pods' PriorityClass.
"""

from __future__ import annotations

from typing import Any, Iterable

from torchx.schedulers.api import DescribeAppResponse, ListAppResponse, Stream
from torchx.specs import AppDef, AppDryRunInfo, AppState, Role, macros

from service.errors import USER_ERROR_EXIT, JobError
from service.launch.cluster import DEFAULTS, ClusterScheduler, api_detail, api_errors
from service.launch.pods import check_for_kubernetes, complete_pod
from service.launch.torchx_api import (
    SubmissionError,
    filter_lines,
    kubernetes_request,
    pod_for_role,
    pod_labels,
    run_option,
    split_lines,
    unique_job_name,
)

API_VERSION = "jobset.x-k8s.io/v1alpha2"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
COORDINATOR = "jobset.sigs.k8s.io/coordinator"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
RESTART_ATTEMPT_LABEL = "jobset.sigs.k8s.io/restart-attempt"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
RANK0_ENV = "TORCHX_RANK0_HOST"
# JobSet's webhook refuses a JobSet whose coordinator label, `<name>-<replicatedJob>-0-0.<name>`, would exceed a label
# value's 63 characters: the name's random suffix is short (6 characters: 4e8 names) so that barlowtwins-eval fits
NAME_SUFFIX_LENGTH = 6
NO_QUEUE = "none"  # the queue option's value on a cluster without Kueue
MAX_LABEL = 63  # a DNS label (a host name) and a label's value
# The Job controller's failure messages for its pod failure policy's two FailJob rules (kubernetes
# pkg/controller/job/pod_failure_policy.go): "Container C for pod NS/P failed with exit code 2 matching FailJob
# rule at index 0" and "Pod NS/P has condition DisruptionTarget matching FailJob rule at index 1"
USER_ERROR_MESSAGE = rf"failed with exit code {USER_ERROR_EXIT} matching FailJob rule at index 0"
DISRUPTION_MESSAGE = r"has condition DisruptionTarget matching FailJob rule at index 1"


def _refuse_what_a_jobset_cannot_run(app: AppDef, name: str) -> None:
    for role in app.roles:
        if role.min_replicas is not None and role.min_replicas < role.num_replicas:
            raise SubmissionError(
                f"nnodes {role.min_replicas}:{role.num_replicas}: a JobSet runs at one size (Kueue admits all its pods "
                f"at once and it has no size between MIN and MAX): use --nnodes {role.num_replicas} with -s jobset, "
                "or -s kubernetes (Volcano) for an elastic job")
    coordinator = f"{name}-{_replicated_job_name(app.roles[0].name)}-0-0.{name}"  # a label value, as JobSet writes it
    hosts = [f"{name}-{_replicated_job_name(role.name)}-0-{role.num_replicas - 1}" for role in app.roles]
    for what, value in [("coordinator's address", coordinator), *(("pods' host name", host) for host in hosts)]:
        if len(value) > MAX_LABEL:
            raise SubmissionError(f"the {what} {value} is longer than {MAX_LABEL} characters (JobSet refuses it): "
                                  "give the job a shorter --name")


def _replicated_job_name(role_name: str) -> str:
    """A role's replicated Job (and container) name: a DNS label."""
    return role_name.lower().replace("_", "-")


def _pod_failure_policy(container: str) -> dict:
    return {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In",
                                               "values": [USER_ERROR_EXIT]}},
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def _failure_policy(max_retries: int) -> dict:
    return {
        "maxRestarts": max_retries,
        "restartStrategy": "BlockingRecreate",
        "rules": [
            {"name": "UserError", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"],
             "onJobFailureMessagePatterns": [USER_ERROR_MESSAGE]},
            {"name": "Disruption", "action": "RestartJobSetAndIgnoreMaxRestarts",
             "onJobFailureReasons": ["PodFailurePolicy"], "onJobFailureMessagePatterns": [DISRUPTION_MESSAGE]},
        ],  # any other failure: RestartJobSet, counted against maxRestarts
    }


def kueue_queue(cfg: Any) -> str | None:
    """The LocalQueue the run options name; None for `none` (or empty): a cluster without Kueue."""
    queue = run_option(cfg, "queue")
    return None if not queue or queue.lower() == NO_QUEUE else queue


def _replicated_job(app: AppDef, index: int, role: Role, name: str, cfg: Any) -> dict:
    """One role as a replicated Job of `num_replicas` indexed pods, each the pod Volcano's task would run."""
    values = macros.Values(img_root="", app_id=name, replica_id="$(JOB_COMPLETION_INDEX)", rank0_env=RANK0_ENV)
    container_name = _replicated_job_name(role.name)
    pod = pod_for_role(container_name, values.apply(role), run_option(cfg, "service_account"))
    spec = complete_pod(pod["spec"], role, cfg)
    for container in spec["containers"]:
        container["env"] = [*container.get("env", []), {
            "name": RANK0_ENV, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COORDINATOR}']"}}}]
    if not kueue_queue(cfg) and run_option(cfg, "priority_class"):
        spec["priorityClassName"] = run_option(cfg, "priority_class")
    template = {"metadata": {"labels": pod_labels(app, index, role, name),
                             "annotations": pod["metadata"]["annotations"]}, "spec": spec}
    return {"name": container_name, "replicas": 1, "template": {"spec": {
        "parallelism": role.num_replicas, "completions": role.num_replicas, "completionMode": "Indexed",
        "backoffLimit": 0, "podFailurePolicy": _pod_failure_policy(container_name), "template": template}}}


def render_jobset(app: AppDef, cfg: Any) -> dict:
    """The JobSet of `app` with the run options `cfg` (see the module docstring)."""
    name = unique_job_name(app.name, NAME_SUFFIX_LENGTH)
    _refuse_what_a_jobset_cannot_run(app, name)
    queue = kueue_queue(cfg)
    labels = {QUEUE_LABEL: queue} if queue else {}
    if queue and run_option(cfg, "priority_class"):
        labels[PRIORITY_LABEL] = run_option(cfg, "priority_class")
    jobs = [_replicated_job(app, index, role, name, cfg) for index, role in enumerate(app.roles)]
    return {
        "apiVersion": API_VERSION, "kind": "JobSet",
        "metadata": {"name": name, **({"labels": labels} if labels else {})},
        "spec": {
            "suspend": bool(queue),  # Kueue starts it when the queue admits every pod
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "coordinator": {"replicatedJob": jobs[0]["name"], "jobIndex": 0, "podIndex": 0},
            "failurePolicy": _failure_policy(min(role.max_retries for role in app.roles)),
            "replicatedJobs": jobs,
        },
    }


def jobset_state(jobset: dict) -> tuple[AppState, str]:
    """A JobSet's state as TorchX names it, and a line on why: from its conditions and terminal state, a suspended
    one (held by its queue) as queued, the rest from its Jobs' counts."""
    spec, status = jobset.get("spec") or {}, jobset.get("status") or {}
    conditions = {c["type"]: c for c in status.get("conditions") or [] if c.get("status") == "True"}
    restarts = status.get("restarts") or 0
    retried = f"; recreated {restarts} time(s), {status.get('restartsCountTowardsMax') or 0} counted" \
        if restarts else ""
    terminal = status.get("terminalState")
    if terminal == "Completed" or "Completed" in conditions:
        return AppState.SUCCEEDED, f"completed{retried}"
    if terminal == "Failed" or "Failed" in conditions:
        why = conditions.get("Failed", {}).get("message") or "failed"
        return AppState.FAILED, f"{why}{retried}"
    if spec.get("suspend") or "Suspended" in conditions:
        queue = (jobset.get("metadata") or {}).get("labels", {}).get(QUEUE_LABEL)
        where = f" by Kueue (LocalQueue {queue})" if queue else ""
        return AppState.PENDING, f"queued: suspended{where} until its quota admits every pod{retried}"
    jobs = status.get("replicatedJobsStatus") or []
    if any((job.get("active") or 0) > 0 for job in jobs):
        ready = sum(job.get("ready") or 0 for job in jobs)
        return AppState.RUNNING, f"running: {ready} of {len(spec.get('replicatedJobs') or [])} Job(s) ready{retried}"
    return AppState.PENDING, f"created; no pod running yet{retried}"


class JobSetScheduler(ClusterScheduler):
    """Renders and creates JobSets; status, logs, list and cancel read them back."""

    group, version, plural = "jobset.x-k8s.io", "v1alpha2", "jobsets"
    queue_help = ("Kueue LocalQueue of the job (label kueue.x-k8s.io/queue-name; created suspended); none: a cluster "
                  "without Kueue")
    priority_help = ("Kueue WorkloadPriorityClass of the job (label kueue.x-k8s.io/priority-class); without a "
                     "queue, the pods' PriorityClass")

    def _submit_dryrun(self, app: AppDef, cfg: Any) -> AppDryRunInfo:
        check_for_kubernetes(app)
        images = self.dryrun_push_images(app, cfg)  # the workspace image (torchx's mixin), pushed by schedule
        return AppDryRunInfo(kubernetes_request(render_jobset(app, cfg), images), repr)

    def first_container(self, job: dict) -> dict:
        return job["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]

    def describe(self, app_id: str) -> DescribeAppResponse | None:
        jobset = self._get(app_id)
        state, message = jobset_state(jobset)
        return DescribeAppResponse(app_id=app_id, state=state, msg=message)

    def list(self) -> list[ListAppResponse]:
        namespace = self.context_namespace() or DEFAULTS["namespace"]
        found = self.custom_objects().list_namespaced_custom_object(
            group=self.group, version=self.version, namespace=namespace, plural=self.plural, timeout_seconds=30)
        return [ListAppResponse(app_id=f"{namespace}:{item['metadata']['name']}", state=jobset_state(item)[0])
                for item in found["items"]]

    def log_iter(self, app_id: str, role_name: str, k: int = 0, regex: str | None = None, since: Any = None,
                 until: Any = None, should_tail: bool = False, streams: Stream | None = None) -> Iterable[str]:
        """The log of the role's k-th pod of the JobSet's newest attempt, found by the labels JobSet and the indexed
        Job give it."""
        from kubernetes import watch

        if until is not None or streams not in (None, Stream.COMBINED):
            raise ValueError("the jobset scheduler reads a pod's combined log, with no end time")
        namespace, _, name = app_id.partition(":")
        core = self.core_api()
        selector = (f"{JOBSET_NAME_LABEL}={name},{REPLICATED_JOB_LABEL}={_replicated_job_name(role_name)},"
                    f"{COMPLETION_INDEX_LABEL}={k}")
        try:
            pods = core.list_namespaced_pod(namespace, label_selector=selector).items
        except api_errors() as error:
            raise JobError(f"job {app_id}: the Kubernetes API refused or could not be reached ({api_detail(error)})"
                           ) from None
        if not pods:
            raise JobError(f"job {app_id}: no pod {k} of {role_name} (yet): `torchx status` says whether it is queued")
        pod = max(pods, key=lambda p: int((p.metadata.labels or {}).get(RESTART_ATTEMPT_LABEL, "0")))
        query: dict[str, Any] = {"name": pod.metadata.name, "namespace": namespace, "timestamps": True}
        if since is not None:
            from datetime import datetime

            query["since_seconds"] = int((datetime.now() - since).total_seconds())
        if should_tail:
            return filter_lines(watch.Watch().stream(core.read_namespaced_pod_log, **query), regex)
        return filter_lines(split_lines(core.read_namespaced_pod_log(**query)), regex)


def create_scheduler(session_name: str, **kwargs: Any) -> JobSetScheduler:
    return JobSetScheduler(session_name=session_name, client=kwargs.get("client"),
                           docker_client=kwargs.get("docker_client"))
