"""The project's `kubernetes` TorchX scheduler: torchx's Volcano scheduler, completed and checked.

Registered under the `torchx.schedulers` entry point as `kubernetes`, so that `torchx run -s kubernetes` (the
command users already type), `barlow submit` and the Python Runner all render the same Volcano Job. torchx 0.7.0
renders one task per replica; each task's pod is completed by service/launch/pods.py (the pod JobSet's scheduler
runs too), and the tasks' policies are made what training needs:
- a user's error (a pod exiting 2: a bad spec, unreachable storage) terminates the job at once, spending no retry;
- for an elastic role (nnodes MIN:MAX), Volcano's RestartTask on a lost pod instead of RestartJob.

Run options (`torchx runopts kubernetes`; set them in .torchxconfig or with -cfg key=value,key=value):
namespace, queue, service_account, priority_class (as torchx's), tolerations, node_selector, image_pull_secrets,
credentials_secret, and the workspace's image_repo and quiet.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from torchx.specs import AppDef, AppDryRunInfo, Role

from service.errors import USER_ERROR_EXIT
from service.launch.cluster import ClusterScheduler
from service.launch.pods import check_for_kubernetes, complete_pod
from service.launch.torchx_api import to_plain_objects

ROLE_LABEL = "torchx.pytorch.org/role-name"
# Volcano applies a task's first matching policy: the exit code's comes before the events'
USER_ERROR_POLICY = {"exitCode": USER_ERROR_EXIT, "action": "TerminateJob"}


def complete_volcano_job(job: dict, app: AppDef, cfg: Any) -> dict:
    """A copy of torchx's rendered Volcano Job with each task's pod completed and its policies set."""
    job = copy.deepcopy(job)
    roles = {role.name: role for role in app.roles}
    for task in job["spec"]["tasks"]:
        role: Role = roles[task["template"]["metadata"]["labels"][ROLE_LABEL]]
        complete_pod(task["template"]["spec"], role, cfg)
        if not task.get("policies"):
            continue
        if role.min_replicas is not None and role.min_replicas < role.num_replicas:
            # elastic: the nodes left go on (torchrun re-forms the rendezvous); only the lost pod is recreated,
            # and joins at the next rendezvous. A fixed-size job keeps torchx's RestartJob: it cannot go on.
            task["policies"] = [{"event": event, "action": "RestartTask"} for event in ("PodEvicted", "PodFailed")]
        task["policies"] = [dict(USER_ERROR_POLICY), *task["policies"]]  # a copy each: no YAML alias in a dry run
    return job


class BarlowKubernetesScheduler(ClusterScheduler):
    """torchx's Kubernetes (Volcano) scheduler with the completion and checks above."""

    group, version, plural = "batch.volcano.sh", "v1alpha1", "jobs"
    queue_help = "Volcano queue of the job"

    def _submit_dryrun(self, app: AppDef, cfg: Any) -> AppDryRunInfo:
        check_for_kubernetes(app)
        with warnings.catch_warnings():
            # torchx warns of a Volcano 1.4 retry bug for every role with retries; Volcano >= 1.6 is required here
            warnings.filterwarnings("ignore", message=r"\s*Role .* configured with restarts")
            info = super()._submit_dryrun(app, cfg)
        info.request.resource = complete_volcano_job(to_plain_objects(info.request.resource), app, cfg)
        return info

    def first_container(self, job: dict) -> dict:
        return job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]


def create_scheduler(session_name: str, **kwargs: Any) -> BarlowKubernetesScheduler:
    return BarlowKubernetesScheduler(session_name=session_name, client=kwargs.get("client"),
                                     docker_client=kwargs.get("docker_client"))
