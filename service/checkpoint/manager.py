"""Saves and restores a run's training state, streamed to any fsspec location (s3://, gs://, file://, memory://).

A checkpoint is committed by its manifest (service/checkpoint/catalog.py), written by rank 0 once every rank's
objects are stored. Restoring checks every object against the manifest as it is read, and a checkpoint that fails is
never loaded: `auto` falls back to the newest one that verifies (the policy: service/checkpoint/resume.py).
Retention counts as newer only checkpoints this run verified (committed itself or restored from), so it never
deletes the newest good one. A state with non-finite values is never written.

The manager is handed the run's lease (service/run/lease.py), held by its caller: every commit first refreshes it,
so a run whose output was taken over stops committing there.

Saving blocks training only while the state is copied to host memory; the upload, the manifest and the retention
run in one background thread (at most one save in flight). Under DDP the checkpoint's collectives use their own
gloo group, so they never interleave with the training step's.
"""

from __future__ import annotations

import datetime
import json
import logging
import platform
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from service.checkpoint import dcp_io, resume
from service.checkpoint.catalog import FORMAT_VERSION, MANIFEST, CheckpointInfo, list_checkpoints
from service.checkpoint.dcp_io import CorruptCheckpoint
from service.errors import CheckpointError
from service.run.layout import checkpoint_url, checkpoints_url
from service.run.lease import Lease, current_job_id
from service.runtime.distributed import Worker
from service.spec import CheckpointSpec, StorageSpec, recipe
from service.storage.filesystem import explain, filesystem, fsspec_options, retry

log = logging.getLogger("barlow")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _all_finite(tree) -> bool:
    if isinstance(tree, torch.Tensor):
        return not tree.is_floating_point() or bool(torch.isfinite(tree).all())
    if isinstance(tree, dict):
        return all(_all_finite(value) for value in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(_all_finite(value) for value in tree)
    return True


def _copy_to_host(tree):
    """A deep copy whose tensors live in host memory, so training can go on mutating the originals."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {key: _copy_to_host(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_copy_to_host(value) for value in tree)
    return tree


class NonFiniteState(RuntimeError):
    """The state to save holds NaN or infinity: it is not written."""


class CheckpointManager:
    """Saves and restores a run's training state: model, optimizer, GradScaler and the position in the data.

    `lease`: the run's lease, held by the caller on rank 0 (None on the other ranks, and where nothing owns the
    output); `group`: the gloo group of the checkpoint's collectives (None in a world of one). `close()` awaits the
    last save; the lease stays the caller's to release.
    """

    def __init__(self, *, run_url: str, spec: CheckpointSpec, storage: StorageSpec, worker: Worker,
                 model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 steps_per_epoch: int, resolved_spec: dict, lease: Lease | None, group: Any = None):
        self.run_url = run_url
        self.spec = spec
        self.storage = storage
        self.worker = worker
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.steps_per_epoch = steps_per_epoch
        self.resolved_spec = resolved_spec
        self.root = checkpoints_url(run_url)
        self.group = group
        self.lease = lease
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.pending: Future | None = None
        self.last_saved_step: int | None = None
        self.committed: list[int] = []
        self.failed: list[int] = []
        self.verified: set[int] = set()  # steps known good: committed by this run, or read and checked by restore
        self.run_id: str | None = None
        self.parent: dict | None = None  # the checkpoint of another output this run started from
        self.changes: list[dict] = []  # the recipe changes allowed at resumes, carried by every manifest
        self.resumed_changes: dict[str, list] = {}  # those of this resume: field -> [old, new]

    def due(self, step: int) -> bool:
        """Whether the spec asks for a checkpoint after `step` completed steps."""
        every_steps, every_epochs = self.spec.every_steps, self.spec.every_epochs
        epoch_end = step % self.steps_per_epoch == 0
        return bool((every_steps and step % every_steps == 0)
                    or (every_epochs and epoch_end and (step // self.steps_per_epoch) % every_epochs == 0))

    def save(self, step: int, wait: bool = False) -> None:
        """Checkpoint the state after `step` completed steps. Blocks only for the copy to host memory."""
        self.wait()
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        staged = {"model": _copy_to_host(model_state), "optimizer": _copy_to_host(optimizer_state)}
        state = dict(
            step=step,
            epoch=step // self.steps_per_epoch,
            batch_in_epoch=step % self.steps_per_epoch,
            steps_per_epoch=self.steps_per_epoch,
            world_size=self.worker.world_size,
            scaler=self.scaler.state_dict(),
        )
        self.last_saved_step = step
        self.pending = self.executor.submit(self._write, step, staged, state)
        if wait:
            self.wait()

    @property
    def last_save_committed(self) -> bool:
        """Whether the newest state this run saved (or resumed from) is committed."""
        return self.last_saved_step is not None and self.last_saved_step in self.verified

    def newest_committed_url(self) -> str | None:
        """The newest checkpoint this run knows to be good."""
        return checkpoint_url(self.run_url, max(self.verified)) if self.verified else None

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        """Await the last save."""
        try:
            self.wait()
        finally:
            self.executor.shutdown()

    def _everyone_agrees(self, mine: bool) -> bool:
        if self.group is None:
            return mine
        vote = torch.tensor([int(mine)])
        dist.all_reduce(vote, op=dist.ReduceOp.MIN, group=self.group)
        return bool(vote.item())

    def _write(self, step: int, staged: dict, state: dict) -> None:
        url = checkpoint_url(self.run_url, step)
        started = time.monotonic()
        options = fsspec_options(url, self.storage)
        try:
            if not self._everyone_agrees(_all_finite(staged)):
                raise NonFiniteState(f"the state after step {step} holds NaN or infinity")
            objects = dcp_io.save(staged, url, options, self.group)
            # rank 0's buffer for gather_object: a None per rank, each replaced by that rank's objects
            everyone: list[Any] | None = [None] * self.worker.world_size if self.worker.is_main else None
            if self.group is not None:
                dist.gather_object(objects, everyone, dst=0, group=self.group)
            else:
                everyone = [objects]
            if self.worker.is_main:
                assert everyone is not None  # rank 0's buffer
                self._commit(url, state, everyone)
        except NonFiniteState as error:
            self.failed.append(step)
            log.error("checkpoint at step %d not written: %s", step, error)
            return
        # any failure of one save is logged and training goes on: the previous checkpoint stays valid
        except (Exception, dcp_io.CheckpointException) as error:  # noqa: BLE001 (CheckpointException: a BaseException)
            self.failed.append(step)
            log.error("checkpoint at step %d failed, training goes on and the previous checkpoint stays valid: %s",
                      step, explain(url, error))
            return
        self.committed.append(step)
        self.verified.add(step)
        if self.worker.is_main:
            log.info("checkpoint %s committed in %.1f s", url, time.monotonic() - started)
            try:
                self._apply_retention()
            except Exception as error:  # noqa: BLE001 - deleting old checkpoints may wait for the next save
                log.warning("could not delete old checkpoints now: %s", explain(self.root, error))

    def _commit(self, url: str, state: dict, rank_objects: list[dict]) -> None:
        if self.lease is not None:  # a conditional rewrite of the lease: LeaseLost if another run took it over
            self.lease.refresh()
        objects = {name: info for per_rank in rank_objects for name, info in per_rank.items()}
        manifest = dict(
            format=FORMAT_VERSION,
            **state,
            run_id=self.run_id,
            job_id=self.lease.record.job_id if self.lease is not None else current_job_id(),
            parent=self.parent,
            changes=self.changes,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            versions=dict(torch=torch.__version__, python=platform.python_version()),
            spec=self.resolved_spec,
            objects=[dict(name=name, **objects[name]) for name in sorted(objects)],
        )
        fs, path = filesystem(url, self.storage)
        body = json.dumps(manifest, indent=1).encode()
        retry(lambda: fs.pipe_file(f"{path}/{MANIFEST}", body), f"writing the manifest of {url}",
              attempts=self.storage.retries + 1)

    def _apply_retention(self) -> None:
        """Keep the last `keep_last` verified checkpoints and every `keep_every_epochs`-th epoch end; delete the
        rest below the newest verified one. Nothing newer than that is ever deleted here."""
        checkpoints = list_checkpoints(self.run_url, self.storage)
        trusted = [c for c in checkpoints if c.valid and c.step in self.verified]
        if not trusted:
            return
        newest = trusted[-1].step
        keep = {c.step for c in trusted[-self.spec.keep_last:]}
        if self.spec.keep_every_epochs:
            keep |= {c.step for c in checkpoints if c.valid and c.manifest is not None  # a valid one has a manifest
                     and c.manifest["batch_in_epoch"] == 0 and c.manifest["epoch"] > 0
                     and c.manifest["epoch"] % self.spec.keep_every_epochs == 0}
        for checkpoint in checkpoints:
            if checkpoint.step < newest and checkpoint.step not in keep:
                fs, path = filesystem(checkpoint.url, self.storage)
                fs.rm(path, recursive=True)
                log.info("deleted %s checkpoint %s", "old" if checkpoint.valid else "incomplete", checkpoint.url)

    def restore(self) -> int:
        """Load the checkpoint the spec's `resume` asks for (service/checkpoint/resume.py); returns the number of
        completed steps (0: fresh). Corrupt candidates are passed over under `auto` (an error otherwise).
        Incomplete or corrupt saves newer than the loaded checkpoint are deleted before training, since this run
        will save those steps again."""
        checkpoints = list_checkpoints(self.run_url, self.storage)
        candidates = resume.candidates(self.spec, checkpoints, self.storage, self.root)
        lineage = self.lease.previous.run_id if self.lease is not None and self.lease.previous else None
        loaded, rejected = None, []
        for candidate in reversed(candidates):
            resume.check_resumable(candidate, spec=self.spec, resolved_spec=self.resolved_spec,
                                   steps_per_epoch=self.steps_per_epoch, run_url=self.run_url, lineage=lineage)
            try:
                self._load(candidate)
            except CorruptCheckpoint as error:
                log.error("%s is corrupt and will not be loaded: %s", candidate.url, error)
                if self.spec.resume != "auto":
                    raise CheckpointError(f"checkpoint.resume={self.spec.resume} cannot be used: {error}") from None
                rejected.append(candidate.step)
                continue
            loaded = candidate
            break
        if candidates and loaded is None:
            raise CheckpointError(
                f"no checkpoint under {self.root} verifies (each is corrupt; `barlow checkpoints ls --verify` lists "
                "them): delete them to start over, or use another run.output"
            )
        start = loaded.step if loaded else 0
        if self.worker.is_main:
            for checkpoint in checkpoints:
                if checkpoint.step >= start and (not checkpoint.valid or checkpoint.step in rejected):
                    fs, path = filesystem(checkpoint.url, self.storage)
                    fs.rm(path, recursive=True)
                    log.warning("deleted %s: this run saves its steps again", checkpoint.url)
        if self.group is not None:
            dist.barrier(group=self.group)
        if loaded is None:
            if self.spec.resume != "none":
                log.info("no checkpoint under %s: starting fresh", self.root)
            return self._start_fresh()
        return self._resumed_from(loaded)

    def _start_fresh(self) -> int:
        self.run_id = new_run_id()
        self._tell_lease()
        return 0

    def _tell_lease(self) -> None:
        if self.lease is not None:
            assert self.run_id is not None  # both callers set it first
            self.lease.set_run_id(self.run_id)

    def _load(self, checkpoint: CheckpointInfo) -> None:
        """Read the checkpoint into host copies of the state, checking every object; only a checkpoint read whole
        and verified is put into the model and the optimizer."""
        assert checkpoint.manifest is not None  # only valid checkpoints are loaded
        scaler_state = checkpoint.manifest["scaler"]
        if self.scaler.is_enabled() and scaler_state and set(scaler_state) != set(self.scaler.state_dict()):
            raise CorruptCheckpoint(f"its manifest's scaler state has the fields {sorted(scaler_state)}, not a "
                                    f"GradScaler's {sorted(self.scaler.state_dict())}")
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        staged = {"model": _copy_to_host(model_state), "optimizer": _copy_to_host(optimizer_state)}
        dcp_io.load(staged, checkpoint.url, checkpoint.objects, fsspec_options(checkpoint.url, self.storage),
                    self.group)
        set_state_dict(self.model, self.optimizer, model_state_dict=staged["model"],
                       optim_state_dict=staged["optimizer"])
        if self.scaler.is_enabled() and scaler_state:
            self.scaler.load_state_dict(scaler_state)

    def _resumed_from(self, checkpoint: CheckpointInfo) -> int:
        manifest = checkpoint.manifest
        assert manifest is not None  # only valid checkpoints are resumed from
        own = checkpoint.url.rstrip("/").startswith(f"{self.root}/")
        if own:
            self.run_id = checkpoint.run_id or new_run_id()  # checkpoints older than run ids get one now
        else:  # a new run branching off another output's checkpoint
            self.run_id = new_run_id()
            self.parent = dict(run_id=checkpoint.run_id, checkpoint=checkpoint.url)
        self._tell_lease()
        changes = recipe.guarded_changes(manifest["spec"], self.resolved_spec)
        self.resumed_changes = {name: [old, new] for name, (old, new) in changes.items()}
        self.changes = [*manifest.get("changes", []),
                        *(dict(step=checkpoint.step, field=name, old=old, new=new)
                          for name, (old, new) in changes.items())]
        self.verified.add(checkpoint.step)
        self.last_saved_step = checkpoint.step
        log.info("resumed from %s: step %d (epoch %d, batch %d of %d)%s", checkpoint.url, checkpoint.step,
                 checkpoint.epoch, manifest["batch_in_epoch"], self.steps_per_epoch,
                 f"; changed on purpose: {recipe.describe(changes)}" if changes else "")
        return checkpoint.step
