"""service/launch/jobset.py: the `jobset` scheduler. Through the torchx CLI as a user types it: the JobSet validates
strictly against the JobSet CRD (and its Job and pod against Kubernetes' schemas), carries Kueue's labels and is
created suspended, and its pod equals the Volcano job's field for field but for what each scheduler names itself;
the refusals hold for both schedulers; the failure policies do what the module says, read as JobSet and the Job
controller read them. Without a cluster: the state of JobSet objects that validate against the CRD's status schema,
and status, logs, cancel and the run's location against a stubbed API (`torchx status|log|cancel`, `barlow
status`)."""

from __future__ import annotations

import copy
import re

import pytest
from torchx import specs
from torchx.runner import get_runner
from torchx.specs import AppState

from components.barlowtwins import evaluate, train
from service.launch.jobset import (
    DISRUPTION_MESSAGE,
    USER_ERROR_MESSAGE,
    JobSetScheduler,
    jobset_state,
)
from service.launch.torchx_api import SubmissionError
from tests.support.commands import barlow, barlow_job, containers, normalised, torchx, torchx_job
from tests.support.k8s_schemas import template_as_pod, validate_core, validate_jobset

DIGITS = ("--spec", "specs/digits.yaml", "--nproc_per_node", "1")
OUTPUT = "run.output=s3://bucket/runs/j"
OPTIONS = ("-cfg", "credentials_secret=barlow-s3-credentials,image_pull_secrets=registry,"
           "tolerations=dedicated:training:NoSchedule,node_selector=pool:h100")


def jobset(*arguments: str, options: tuple[str, ...] = OPTIONS) -> dict:
    """`torchx run -s jobset OPTIONS barlowtwins.train ARGUMENTS`, writing to OUTPUT unless ARGUMENTS say where."""
    output = () if any(a.startswith("run.output=") for a in arguments) else (OUTPUT,)
    return torchx_job(*options, "barlowtwins.train", *arguments, *output, scheduler="jobset")


def replicated_job(js: dict) -> dict:
    (only,) = js["spec"]["replicatedJobs"]
    return only


@pytest.mark.parametrize("component, resources", [
    ("barlowtwins.train", ("--h", "gpu_8xh100")),
    ("components/barlowtwins.py:train", ("--gpu", "8", "--cpu", "96", "--memMB", "700000")),  # as a file, explicit
])
def test_the_rendered_jobset_validates_strictly_and_queues_in_kueue(component, resources):
    js = torchx_job(*OPTIONS, component, "--spec", "specs/imagenet-1000ep.yaml", *resources, "--nnodes", "4",
                    "--max_retries", "5", "run.output=s3://bucket/runs/j", scheduler="jobset")
    validate_jobset(js)
    rj = replicated_job(js)
    job = rj["template"]["spec"]
    validate_core({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}, "spec": job})
    validate_core(template_as_pod(job["template"]))
    name = js["metadata"]["name"]
    # .torchxconfig's [jobset] section: the LocalQueue and WorkloadPriorityClass of k8s/overlays/kueue
    assert js["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "barlow",
                                        "kueue.x-k8s.io/priority-class": "barlow-training"}
    assert js["spec"]["suspend"] is True  # Kueue starts it when all 4 pods fit the quota
    assert "priorityClassName" not in job["template"]["spec"]
    assert (rj["name"], rj["replicas"], job["parallelism"], job["completions"], job["completionMode"]) == \
        ("trainer", 1, 4, 4, "Indexed")
    assert js["spec"]["network"]["enableDNSHostnames"] is True
    assert js["spec"]["coordinator"] == {"replicatedJob": "trainer", "jobIndex": 0, "podIndex": 0}
    assert js["spec"]["failurePolicy"]["maxRestarts"] == 5  # --max_retries, handed over as a string
    assert len(f"{name}-trainer-0-3") <= 63


def test_without_a_queue_the_jobset_starts_at_once_and_the_priority_is_the_pods():
    js = jobset(*DIGITS, options=("-cfg", "queue=none,priority_class=barlow-training"))
    validate_jobset(js)
    assert js["spec"]["suspend"] is False and "labels" not in js["metadata"]
    assert replicated_job(js)["template"]["spec"]["template"]["spec"]["priorityClassName"] == "barlow-training"
    app = train("specs/digits.yaml", OUTPUT)
    empty = get_runner().dryrun(app, "jobset", cfg={"queue": ""}, workspace=None).request.resource  # .torchxconfig
    assert empty["spec"]["suspend"] is False and "labels" not in empty["metadata"]


def test_the_rendezvous_is_on_the_coordinators_stable_host_name():
    (container,) = containers(jobset(*DIGITS, "--nnodes", "2"))
    assert "--rdzv_endpoint ${TORCHX_RANK0_HOST:=localhost}:29500" in container["command"][2]
    (rank0,) = [item for item in container["env"] if item["name"] == "TORCHX_RANK0_HOST"]
    assert rank0 == {"name": "TORCHX_RANK0_HOST", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/coordinator']"}}}


def _pod(job: dict) -> dict:
    """The pod spec of a Volcano Job's second task or of a JobSet, with what each scheduler names itself by put
    to one side: the container's name (a task's trainer-1, the replicated Job's trainer), the job's unique name, the
    scheduler in TORCHX_JOB_ID, and the variable that carries the first node's address (Volcano's svc plugin's
    VC_TRAINER_0_HOSTS; JobSet's coordinator annotation through the downward API)."""
    job = normalised(job)
    if job["kind"] == "JobSet":
        pod = replicated_job(job)["template"]["spec"]["template"]["spec"]
    else:
        pod = job["spec"]["tasks"][1]["template"]["spec"]
    pod = copy.deepcopy(pod)
    container = pod["containers"][0]
    container["name"] = "NAME"
    container["command"][2] = re.sub(r"\$\{\w+:=localhost\}", "${RANK0:=localhost}", container["command"][2])
    container["env"] = [item for item in container["env"] if item["name"] not in ("TORCHX_RANK0_HOST",)]
    for item in container["env"]:
        if item["name"] == "TORCHX_JOB_ID":
            item["value"] = item["value"].split("://")[1]
    return pod


@pytest.mark.parametrize("arguments", [
    ("--spec", "specs/imagenet-1000ep.yaml", "--h", "gpu_8xh100", "--nnodes", "2", "--env", "NCCL_DEBUG=INFO",
     "--mounts", "type=volume,src=imagenet,dst=/data/imagenet,readonly", "run.output=s3://b/r"),
    (*DIGITS, "--nnodes", "2", "--cpu", "3", "--memMB", "5000", "--shmMB", "700", OUTPUT),
])
def test_the_pod_equals_the_volcano_jobs_field_for_field(arguments):
    volcano = torchx_job(*OPTIONS, "barlowtwins.train", *arguments)
    js = jobset(*arguments)
    assert _pod(js) == _pod(volcano)
    # what was put to one side is only that: the rest of the command and environment are equal
    assert "VC_TRAINER_0_HOSTS" in volcano["spec"]["tasks"][1]["template"]["spec"]["containers"][0]["command"][2]


def test_barlow_submit_renders_the_same_jobset_as_torchx_run():
    arguments = ("--nnodes", "2", "--nproc-per-node", "1", "--set", "run.output=s3://bucket/runs/j")
    submitted = barlow_job("specs/digits.yaml", *arguments, scheduler="jobset")
    typed = jobset(*DIGITS, "--nnodes", "2", options=())
    assert normalised(submitted) == normalised(typed)


@pytest.mark.parametrize("scheduler", ["kubernetes", "jobset"])
@pytest.mark.parametrize("arguments, why", [
    (("run.output=./checkpoint",), "pod's own disk"),
    (("run.output=memory://runs/x",), "memory of one process"),
    (("--mounts", "type=device,src=/dev/fuse", "run.output=s3://b/r"), "privileged"),
    (("run.output=s3://b/r", "optim.epochs=0"), "optim.epochs"),  # the spec
    (("--image", "Registry/Trainer:latest", "run.output=s3://b/r"), "is not an image reference"),
    (("--h", "gpu_8xh100", "--gpu", "16", "run.output=s3://b/r"), "does not fit a gpu_8xh100 node"),
])
def test_what_cannot_run_is_refused_by_both_schedulers_before_submission(scheduler, arguments, why):
    result = torchx("run", "--workspace", "", "--dryrun", "-s", scheduler, "barlowtwins.train", "--spec",
                    "specs/digits.yaml", *arguments)
    assert result.returncode == 1 and why in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_an_elastic_size_is_refused_with_what_to_use_instead():
    result = torchx("run", "--workspace", "", "--dryrun", "-s", "jobset", "barlowtwins.train", *DIGITS, "--nnodes",
                    "2:4", OUTPUT)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "use --nnodes 4 with -s jobset, or -s kubernetes (Volcano) for an elastic job" in result.stderr


@pytest.mark.parametrize("make", [
    lambda: train("specs/digits.yaml", "run.output=s3://b/r", nnodes="16"),
    lambda: evaluate("specs/imagenet-linear.yaml", "run.output=s3://b/r", nnodes="16", gpu=8),
])
def test_the_default_names_fit_jobsets_coordinator_label(make):
    """JobSet's webhook refuses a JobSet whose coordinator label (`<name>-<replicatedJob>-0-0.<name>`) exceeds 63
    characters: with torchx's usual 10-14 character suffix, `barlowtwins` drew a refused name 6 times in 10."""
    for _ in range(20):  # the suffix has a fixed length: every draw is as long
        js = get_runner().dryrun(make(), "jobset", cfg={}, workspace=None).request.resource
        name, role = js["metadata"]["name"], replicated_job(js)["name"]
        assert len(f"{name}-{role}-0-0.{name}") <= 63 and len(f"{name}-{role}-0-15") <= 63


def test_a_name_too_long_for_jobset_is_refused():
    app = train("specs/digits.yaml", "run.output=s3://b/r", nnodes="2", name="a" * 22)
    with pytest.raises(SubmissionError, match="coordinator's address .* is longer than 63 .* shorter --name"):
        get_runner().dryrun(app, "jobset", cfg={}, workspace=None)
    typed = torchx("run", "--workspace", "", "--dryrun", "-s", "jobset", "barlowtwins.train", *DIGITS, "--nnodes", "2",
                   "--name", "a" * 22, OUTPUT)  # as a user types it: one line, exit 1, nothing rendered
    assert typed.returncode == 1 and "shorter --name" in typed.stderr and "Traceback" not in typed.stderr
    assert "=== SCHEDULER REQUEST ===" not in typed.stdout


# The Job controller's messages for the FailJob rules of a pod failure policy (kubernetes
# pkg/controller/job/pod_failure_policy.go), written here from its format strings
def exit_code_message(code: int, rule: int) -> str:
    return f"Container trainer for pod barlow/j-trainer-0-1-x7k2p failed with exit code {code} matching FailJob " \
           f"rule at index {rule}"


def condition_message(condition: str, rule: int) -> str:
    return f"Pod barlow/j-trainer-0-1-x7k2p has condition {condition} matching FailJob rule at index {rule}"


def job_failure(job: dict, exit_code: int | None = None, condition: str | None = None) -> tuple[str, str]:
    """The reason and message with which the Job fails when one of its pods ends so: the first matching rule of
    its pod failure policy, else its backoff limit (0: the first failed pod)."""
    for index, rule in enumerate(job["podFailurePolicy"]["rules"]):
        codes = rule.get("onExitCodes")
        if codes and exit_code is not None and exit_code in codes["values"]:
            assert rule["action"] == "FailJob" and codes["operator"] == "In"
            return "PodFailurePolicy", exit_code_message(exit_code, index)
        if condition and any(c["type"] == condition for c in rule.get("onPodConditions", [])):
            assert rule["action"] == "FailJob"
            return "PodFailurePolicy", condition_message(condition, index)
    assert job["backoffLimit"] == 0
    return "BackoffLimitExceeded", "Job has reached the specified backoff limit"


def jobset_action(js: dict, reason: str, message: str) -> str:
    """The action of the JobSet's first failure rule that matches the Job's failure (reason and a message pattern,
    RE2 syntax, which Python's re reads alike for these), else RestartJobSet."""
    for rule in js["spec"]["failurePolicy"]["rules"]:
        if reason in rule.get("onJobFailureReasons", [reason]) and any(
                re.search(pattern, message) for pattern in rule.get("onJobFailureMessagePatterns", [".*"])):
            return rule["action"]
    return "RestartJobSet"


@pytest.mark.parametrize("exit_code, condition, action", [
    (2, None, "FailJobSet"),  # a worker's user error (service.launch.torchrun): no retry mends it
    (None, "DisruptionTarget", "RestartJobSetAndIgnoreMaxRestarts"),  # pre-empted, evicted, node lost
    (1, None, "RestartJobSet"),  # a crash: recreated, counted against max_retries
    (137, None, "RestartJobSet"),  # killed (out of memory)
    (21, None, "RestartJobSet"),  # an exit code that only begins with 2
])
def test_a_pods_failure_leads_to_the_jobset_action_the_policies_say(exit_code, condition, action):
    js = jobset(*DIGITS, "--nnodes", "2")
    reason, message = job_failure(replicated_job(js)["template"]["spec"], exit_code, condition)
    assert jobset_action(js, reason, message) == action
    assert js["spec"]["failurePolicy"]["restartStrategy"] == "BlockingRecreate"


def test_the_message_patterns_name_the_pod_failure_policys_rules_in_their_order():
    """Reordering the pod failure policy's rules changes the Job controller's messages: the patterns must follow."""
    assert re.search(USER_ERROR_MESSAGE, exit_code_message(2, 0))
    assert not re.search(USER_ERROR_MESSAGE, exit_code_message(2, 1))
    assert re.search(DISRUPTION_MESSAGE, condition_message("DisruptionTarget", 1))
    assert not re.search(DISRUPTION_MESSAGE, condition_message("DisruptionTarget", 0))


# JobSets as the API server returns them, each status as JobSet's controller writes it
NAME = "barlowtwins-j1"


@pytest.fixture(scope="module")
def rendered() -> dict:
    return jobset(*DIGITS, "--nnodes", "2")


def returned(rendered: dict, status: dict | None, suspend: bool = False) -> dict:
    js = copy.deepcopy(rendered)
    js["metadata"]["name"] = NAME
    js["spec"]["suspend"] = suspend
    if status is not None:
        js["status"] = copy.deepcopy(status)
    validate_jobset(js)
    return js


def condition(kind: str, message: str = "") -> dict:
    return {"type": kind, "status": "True", "reason": kind, "message": message,
            "lastTransitionTime": "2026-12-06T10:00:00Z"}


def jobs(active: int = 0, ready: int = 0, succeeded: int = 0, failed: int = 0) -> list[dict]:
    return [{"name": "trainer", "active": active, "ready": ready, "succeeded": succeeded, "failed": failed,
             "suspended": 0}]


QUEUED = {"conditions": [condition("Suspended", "jobset is suspended")]}
RUNNING = {"replicatedJobsStatus": jobs(active=1, ready=1)}
STATES = {  # status, suspended, state, message
    "queued": (QUEUED, True, AppState.PENDING,
               "queued: suspended by Kueue (LocalQueue barlow) until its quota admits every pod"),
    "just created": (None, False, AppState.PENDING, "created; no pod running yet"),
    "running": (RUNNING, False, AppState.RUNNING, "running: 1 of 1 Job(s) ready"),
    "recreated": ({"restarts": 2, "restartsCountTowardsMax": 1, "replicatedJobsStatus": jobs(active=1)}, False,
                  AppState.RUNNING, "running: 0 of 1 Job(s) ready; recreated 2 time(s), 1 counted"),
    "succeeded": ({"terminalState": "Completed", "conditions": [condition("Completed")],
                   "replicatedJobsStatus": jobs(succeeded=1)}, False, AppState.SUCCEEDED, "completed"),
    "failed": ({"terminalState": "Failed", "restarts": 3, "restartsCountTowardsMax": 3,
                "conditions": [condition("Failed", "jobset failed due to reaching max number of restarts")],
                "replicatedJobsStatus": jobs(failed=1)}, False,
               AppState.FAILED, "jobset failed due to reaching max number of restarts; recreated 3 time(s), 3 counted"),
}


@pytest.mark.parametrize("case", list(STATES))
def test_the_state_of_a_jobset(rendered, case):
    status, suspended, state, message = STATES[case]
    assert jobset_state(returned(rendered, status, suspended)) == (state, message)


def test_a_status_with_a_misspelt_field_is_not_a_jobset_status(rendered):
    js = returned(rendered, RUNNING)
    js["status"]["restart"] = 1
    with pytest.raises(AssertionError, match="restart"):
        validate_jobset(js)


class Api:
    """CustomObjectsApi's calls the scheduler makes, answering with one JobSet; the calls are recorded."""

    def __init__(self, job: dict):
        self.job, self.calls = job, []

    def get_namespaced_custom_object(self, **query):
        self.calls.append(("get", query))
        return self.job

    def delete_namespaced_custom_object(self, **query):
        self.calls.append(("delete", query))


@pytest.fixture
def api(monkeypatch, rendered) -> Api:
    stub = Api(returned(rendered, QUEUED, suspend=True))
    monkeypatch.setattr(JobSetScheduler, "_custom_objects_api", lambda self: stub)
    return stub


def test_torchx_status_shows_a_suspended_jobset_as_queued(api):
    result = torchx("status", f"jobset://torchx/barlow:{NAME}")
    assert result.returncode == 0, result.stderr
    assert "PENDING" in result.stdout and "queued: suspended by Kueue (LocalQueue barlow)" in result.stdout
    assert api.calls == [("get", {"group": "jobset.x-k8s.io", "version": "v1alpha2", "namespace": "barlow",
                                  "plural": "jobsets", "name": NAME})]


def test_torchx_cancel_deletes_the_jobset_and_its_pods(api):
    result = torchx("cancel", f"jobset://torchx/barlow:{NAME}")
    assert result.returncode == 0, result.stderr
    assert api.calls[-1] == ("delete", {"group": "jobset.x-k8s.io", "version": "v1alpha2", "namespace": "barlow",
                                        "plural": "jobsets", "name": NAME, "propagation_policy": "Background"})


def test_barlow_status_of_a_jobset_reads_where_its_run_writes(api, rendered):
    """The run is on an S3 endpoint nobody serves: status says the job's state, then fails on the run's storage
    with one line that names the run the JobSet's spec gave."""
    api.job = returned(rendered, RUNNING)
    result = barlow("status", f"jobset://torchx/barlow:{NAME}", "--endpoint-url", "http://127.0.0.1:9")
    assert result.stdout.startswith("AppStatus:") and "RUNNING" in result.stdout, result.stdout
    assert result.returncode == 2 and "s3://bucket/runs/j" in result.stderr, result.stderr
    assert JobSetScheduler("torchx").run_location(f"barlow:{NAME}")[0] == "s3://bucket/runs/j"


class Pod:
    def __init__(self, name: str, attempt: int):
        self.metadata = type("Metadata", (), {"name": name, "labels": {
            "jobset.sigs.k8s.io/restart-attempt": str(attempt)}})()


class CoreApi:
    """CoreV1Api's two calls for a log: the pods of a label selector (old attempt's pod still terminating)."""
    selectors: list[str] = []

    def __init__(self, _client):
        pass

    def list_namespaced_pod(self, namespace, label_selector):
        CoreApi.selectors.append(f"{namespace}/{label_selector}")
        return type("PodList", (), {"items": [Pod("old", 0), Pod("new", 1)]})()

    def read_namespaced_pod_log(self, name, namespace, timestamps):
        return f"2026-12-06T10:00:00Z {name} step 1\n2026-12-06T10:00:01Z {name} step 2\n"


def test_torchx_log_reads_the_pod_of_the_newest_attempt_by_its_labels(api, monkeypatch):
    monkeypatch.setattr("kubernetes.client.CoreV1Api", CoreApi)
    monkeypatch.setattr(JobSetScheduler, "_api_client", lambda self: None)
    result = torchx("log", f"jobset://torchx/barlow:{NAME}/trainer/1")
    assert result.returncode == 0, result.stderr
    assert "new step 2" in result.stdout and "old" not in result.stdout
    assert CoreApi.selectors[-1] == ("barlow/jobset.sigs.k8s.io/jobset-name=barlowtwins-j1,"
                                     "jobset.sigs.k8s.io/replicatedjob-name=trainer,"
                                     "batch.kubernetes.io/job-completion-index=1")


def test_other_components_run_as_a_jobset_with_their_own_image_user():
    app = specs.AppDef("echo", roles=[specs.Role("echo", image="alpine:3", entrypoint="echo", args=["hi"],
                                                 resource=specs.Resource(cpu=1, gpu=0, memMB=2048))])
    js = get_runner().dryrun(app, "jobset", cfg={}, workspace=None).request.resource
    validate_jobset(js)
    pod = replicated_job(js)["template"]["spec"]["template"]["spec"]
    assert "securityContext" not in pod and pod["containers"][0]["resources"]["requests"]["memory"] == "2048Mi"


@pytest.mark.parametrize("scheduler", ["kubernetes", "jobset"])
def test_the_dry_run_prints_every_object_in_full(scheduler):
    """An object shared between tasks (the user-error policy) came out of `barlow submit --dryrun` as a YAML alias
    (`- &id001` ... `- *id001`): unreadable to a user. torchx run's own printer is checked alike."""
    submitted = barlow("submit", "specs/digits.yaml", "--scheduler", scheduler, "--nnodes", "2", "--nproc-per-node",
                       "1", "--set", OUTPUT, "--dryrun")
    typed = torchx("run", "--workspace", "", "--dryrun", "-s", scheduler, "barlowtwins.train", *DIGITS, "--nnodes",
                   "2", OUTPUT)
    for result in (submitted, typed):
        assert result.returncode == 0, result.stderr
        assert scheduler == "jobset" or "exitCode" in result.stdout  # the Volcano tasks share the policy
        assert not re.search(r"[&*]id\d+", result.stdout)
