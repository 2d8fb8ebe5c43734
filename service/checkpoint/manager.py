"""Checkpoints streamed to any fsspec location (s3://, gs://, file://, memory://), committed by a manifest.

Layout: RUN/checkpoints/step-000000123/ holds one DCP checkpoint (each rank writes its share) and, written last by
rank 0 once every rank's objects are stored, `manifest.json`: step, epoch, position inside the epoch, world size,
run and job ids, versions, the GradScaler state, the resolved spec, the recipe changes allowed so far, and every
object with its size and CRC32. A prefix without a valid manifest is not a checkpoint: it is reported, skipped,
and deleted once a newer checkpoint is committed.

Nothing is trusted unread: restoring and exporting check every object against the manifest as it is read, and a
checkpoint that fails is never loaded; restore falls back to the newest one that verifies. Retention counts as
newer only checkpoints this run verified (committed itself or restored from), so it never deletes the newest good
one. A state with non-finite values is never written. One run owns `RUN` through its lease (service/run/lease.py).

Saving blocks training only while the state is copied to host memory; the upload, the manifest and the retention
run in one background thread (at most one save in flight). Under DDP the checkpoint's collectives use their own
gloo group, so they never interleave with the training step's.
"""

from __future__ import annotations

import datetime
import json
import logging
import platform
import re
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from typing_extensions import NotRequired, TypedDict

from service.errors import CheckpointError, StorageError
from service.runtime.distributed import Worker, new_cpu_group
from service.spec import CheckpointSpec, StorageSpec
from service.checkpoint import dcp_io
from service.spec import recipe
from service.checkpoint.dcp_io import CorruptCheckpoint
from service.storage.filesystem import check_writable, explain, filesystem, fsspec_options, retry
from service.run.lease import Lease, LeaseHeld, current_job_id
from service.storage.untrusted import MiB, UntrustedObject, parse_json, read_bounded

log = logging.getLogger("barlow")

MANIFEST = "manifest.json"
MANIFEST_LIMIT = 16 * MiB  # ~10 KB for one worker, ~100 B more per worker: room for 100,000 and the spec
FORMAT_VERSION = 1
CHECKPOINT_NAME = re.compile(r"step-([0-9]{9})")


class _StoredObject(TypedDict):
    name: str
    size: int
    crc32: int


@with_config(ConfigDict(extra="allow", strict=True))
class _Manifest(TypedDict):
    """The fields of manifest.json this project reads, with their types (strict: "8" is not 8); others are kept."""

    format: int
    step: int
    epoch: int
    batch_in_epoch: int
    steps_per_epoch: int
    world_size: int
    scaler: dict[str, int | float]
    spec: dict[str, dict[str, Any]]
    objects: list[_StoredObject]
    run_id: NotRequired[str | None]  # absent from checkpoints older than run ids
    parent: NotRequired[dict[str, Any] | None]
    changes: NotRequired[list[dict[str, Any]]]
    created: NotRequired[str]


_MANIFEST = TypeAdapter(_Manifest)


def read_manifest(fs, path: str) -> dict:
    """A checkpoint's manifest.json, read with a size limit and checked in type and in its object names;
    UntrustedObject naming the file and what is wrong otherwise."""
    manifest = parse_json(read_bounded(fs, path, MANIFEST_LIMIT, "checkpoint manifest"), path)
    try:
        checked: dict[str, Any] = dict(_MANIFEST.validate_python(manifest))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UntrustedObject(f"{path}: {where}: {first['msg']}") from None
    for entry in checked["objects"]:
        dcp_io.checked_name_of(entry["name"], path)
    return checked


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def checkpoint_step(url: str) -> int | None:
    """The step of a checkpoint prefix named step-NNNNNNNNN, None for any other name (step-8.bak, tmp, ...)."""
    match = CHECKPOINT_NAME.fullmatch(url.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def checkpoints_url(run_url: str) -> str:
    return f"{run_url.rstrip('/')}/checkpoints"


@dataclass(frozen=True)
class CheckpointInfo:
    url: str
    step: int
    manifest: dict | None
    problem: str | None = None

    @property
    def valid(self) -> bool:
        return self.problem is None

    @property
    def epoch(self) -> int | None:
        return self.manifest["epoch"] if self.manifest else None

    @property
    def size(self) -> int:
        return sum(obj["size"] for obj in self.manifest["objects"]) if self.manifest else 0

    @property
    def run_id(self) -> str | None:
        return self.manifest.get("run_id") if self.manifest else None

    @property
    def objects(self) -> dict[str, dict[str, int]]:
        """The manifest's objects by name: size and CRC32."""
        return {obj["name"]: obj for obj in self.manifest["objects"]} if self.manifest else {}


def inspect_checkpoint(url: str, storage: StorageSpec) -> CheckpointInfo:
    """Read one checkpoint's manifest and check that every object it lists is stored with its size.

    Cheap (a listing and the manifest); `verify_checkpoint` also reads every byte.
    """
    fs, path = filesystem(url, storage)
    step = checkpoint_step(path)
    if step is None:
        return CheckpointInfo(url, -1, None, "not a checkpoint: its name is not step-NNNNNNNNN")
    try:
        stored = {entry["name"].rsplit("/", 1)[-1]: entry["size"] for entry in fs.ls(path, detail=True, refresh=True)}
    except FileNotFoundError:
        return CheckpointInfo(url, step, None, "does not exist")
    if MANIFEST not in stored:
        return CheckpointInfo(url, step, None, "no manifest: an incomplete save")
    try:
        manifest = read_manifest(fs, f"{path.rstrip('/')}/{MANIFEST}")
    except (UntrustedObject, CorruptCheckpoint) as error:
        return CheckpointInfo(url, step, None, f"unreadable manifest ({error})")
    if manifest["step"] != step:
        return CheckpointInfo(url, step, manifest, f"its manifest is for step {manifest['step']}")
    for name, size in ((obj["name"], obj["size"]) for obj in manifest["objects"]):
        if stored.get(name) != size:
            return CheckpointInfo(url, step, manifest, f"object {name} is missing or has the wrong size")
    return CheckpointInfo(url, step, manifest)


def verify_checkpoint(url: str, storage: StorageSpec) -> CheckpointInfo:
    """`inspect_checkpoint`, then every object read and compared with its manifest's size and CRC32, and the
    metadata read with the restricted unpickler a load uses."""
    checkpoint = inspect_checkpoint(url, storage)
    if not checkpoint.valid:
        return checkpoint
    fs, path = filesystem(url, storage)
    for name, listed in checkpoint.objects.items():
        try:
            if name.endswith(".metadata"):  # read as a load reads it: a foreign pickle shows here, unrun
                dcp_io.read_metadata(dcp_io.read_verified(fs, f"{path.rstrip('/')}/{name}", checkpoint.objects), name)
            else:
                dcp_io.check_object(fs, f"{path.rstrip('/')}/{name}", listed)
        except CorruptCheckpoint as error:
            return replace(checkpoint, problem=str(error))
    return checkpoint


def list_checkpoints(run_url: str, storage: StorageSpec) -> list[CheckpointInfo]:
    """Every checkpoint prefix (step-NNNNNNNNN) under the run, valid or not, oldest first; other names are not
    checkpoints and are left alone."""
    root = checkpoints_url(run_url)
    fs, path = filesystem(root, storage)
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    names = sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry["type"] == "directory")
    return [inspect_checkpoint(f"{root}/{name}", storage) for name in names if CHECKPOINT_NAME.fullmatch(name)]


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

    Construction takes the run's lease (`force`: take it from a live holder); `close()` awaits the last save and
    gives the lease back.
    """

    def __init__(self, *, run_url: str, spec: CheckpointSpec, storage: StorageSpec, worker: Worker,
                 model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 steps_per_epoch: int, resolved_spec: dict, force: bool = False):
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
        check_writable(self.root, storage)
        self.group = new_cpu_group()
        self.lease = self._take_lease(force)
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

    def _take_lease(self, force: bool) -> Lease | None:
        """Rank 0 takes the run's lease and tells the others; every rank fails alike when it is held."""
        lease, refusal = None, None
        if self.worker.is_main:
            try:
                lease = Lease.acquire(self.run_url, self.storage, job_id=current_job_id(),
                                      timeout_s=self.spec.lease_timeout, force=force)
                lease.start_heartbeat(self.spec.lease_timeout / 4)
            except (LeaseHeld, StorageError) as error:  # told to every rank: none may wait in a collective
                refusal = str(error)
        if self.group is not None:
            message = [refusal]
            dist.broadcast_object_list(message, src=0, group=self.group)
            refusal = message[0]
        if refusal:
            raise CheckpointError(refusal)
        return lease

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
        return f"{self.root}/{checkpoint_name(max(self.verified))}" if self.verified else None

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        """Await the last save and give the lease back."""
        try:
            self.wait()
            self.executor.shutdown()
        finally:
            if self.lease is not None:
                self.lease.release()
                self.lease = None

    def _everyone_agrees(self, mine: bool) -> bool:
        if self.group is None:
            return mine
        vote = torch.tensor([int(mine)])
        dist.all_reduce(vote, op=dist.ReduceOp.MIN, group=self.group)
        return bool(vote.item())

    def _write(self, step: int, staged: dict, state: dict) -> None:
        url = f"{self.root}/{checkpoint_name(step)}"
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
        """Load the checkpoint the spec's `resume` asks for; returns the number of completed steps (0: fresh).

        `auto` takes the newest checkpoint under run.output that verifies, falling back past corrupt ones; a
        checkpoint URL takes that one or fails. Incomplete or corrupt saves newer than the loaded checkpoint are
        deleted before training, since this run will save those steps again.
        """
        checkpoints = list_checkpoints(self.run_url, self.storage)
        if self.spec.resume == "none":
            if checkpoints:
                raise CheckpointError(
                    f"{self.root} already holds checkpoints and checkpoint.resume=none: choose another run.output, "
                    "delete them, or resume with checkpoint.resume=auto"
                )
            return self._start_fresh()
        if self.spec.resume == "auto":
            for checkpoint in checkpoints:
                if not checkpoint.valid:
                    log.warning("ignoring %s: %s", checkpoint.url, checkpoint.problem)
            candidates = [c for c in checkpoints if c.valid]
        else:
            chosen = inspect_checkpoint(self.spec.resume, self.storage)
            if not chosen.valid:
                raise CheckpointError(f"checkpoint.resume={self.spec.resume} cannot be used: {chosen.problem}")
            newer = [c.url for c in checkpoints if c.valid and c.step > chosen.step]
            if newer:
                raise CheckpointError(
                    f"run.output already holds newer checkpoints ({newer[-1]}) that this run would collide with: "
                    "resume into another run.output"
                )
            candidates = [chosen]
        loaded, rejected = None, []
        for candidate in reversed(candidates):
            self._check_resumable(candidate)
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

    def _check_resumable(self, checkpoint: CheckpointInfo) -> None:
        """Refuse a checkpoint of another run, of another recipe, or of another number of steps per epoch."""
        assert checkpoint.manifest is not None  # only valid checkpoints are checked
        lineage = self.lease.previous.run_id if self.lease is not None and self.lease.previous else None
        if self.spec.resume == "auto" and lineage and checkpoint.run_id and checkpoint.run_id != lineage:
            raise CheckpointError(
                f"{checkpoint.url} was written by run {checkpoint.run_id}, but {self.run_url} belongs to run "
                f"{lineage} (its lease): resume it on purpose with checkpoint.resume={checkpoint.url}, or remove it"
            )
        refused = recipe.refused_changes(checkpoint.manifest["spec"], self.resolved_spec, self.spec.allow_changes)
        if refused:
            raise CheckpointError(
                f"{checkpoint.url} was trained with another recipe: {recipe.describe(refused)}. Resume with the "
                "checkpoint's values, name the fields in checkpoint.allow_changes to change them on purpose (e.g. "
                f"--set 'checkpoint.allow_changes=[{', '.join(refused)}]'), or start a new run.output"
            )
        if checkpoint.manifest["steps_per_epoch"] != self.steps_per_epoch:
            raise CheckpointError(
                f"{checkpoint.url} was made with {checkpoint.manifest['steps_per_epoch']} steps per epoch, this run "
                f"has {self.steps_per_epoch}: keep optim.batch_size and the data set of the run to resume it"
            )
