"""`barlow status`: a job's state from its scheduler, then its run's progress read from the run's storage (the run's
location comes from the spec the job carries; service/reports/progress.py reads the rest)."""

from __future__ import annotations

from torchx.runner import get_runner
from torchx.schedulers import get_scheduler_factories
from torchx.specs.api import parse_app_handle

from service.errors import JobError
from service.launch.cluster import ClusterScheduler
from service.reports.progress import NoRun, format_status, read_progress
from service.spec import StorageSpec
from service.storage.filesystem import is_remote


def print_status(target: str, storage: StorageSpec) -> int:
    """`barlow status TARGET`: a TorchX handle's state and its run's progress, or a run's progress by its URL."""
    scheduler = _torchx_scheduler(target)
    if scheduler is None:
        print(format_status(read_progress(target, storage)))
        return 0

    status = get_runner().status(target)
    if status is None:
        raise JobError(f"{target}: no such job (the {scheduler} scheduler does not know it)")
    print(status)
    handle = parse_app_handle(target)
    cluster = get_scheduler_factories()[scheduler](session_name=handle.session_name)
    if not isinstance(cluster, ClusterScheduler):
        print(f"the run's progress: barlow status RUN_URL (the job's run.output; the {scheduler} scheduler keeps no "
              "record of it)")
        return 0
    location = cluster.run_location(handle.app_id)
    if location is None:
        print("the run's progress: barlow status RUN_URL (the job carries no resolved spec, so its run.output is "
              "not known here)")
        return 0
    run_url, job_storage = location
    if not is_remote(run_url):
        print(f"the run writes to {run_url} on the pods' volume, which cannot be read from here")
        return 0
    given = {key: getattr(storage, key) for key in ("endpoint_url", "region", "profile") if getattr(storage, key)}
    try:
        progress = read_progress(run_url, job_storage.model_copy(update=given))
    except NoRun:
        print(f"{run_url}: nothing written yet (the job has not started training)")
        return 0
    print(format_status(progress))
    return 0


def _torchx_scheduler(target: str) -> str | None:
    """The TorchX scheduler a handle names (kubernetes://SESSION/NAMESPACE:NAME, jobset://...), None for a run's
    location."""
    scheme, sep, _ = target.partition("://")
    if not sep:
        return None
    return scheme if scheme in get_scheduler_factories() else None
