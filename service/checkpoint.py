"""Checkpoints streamed to any fsspec location (s3://, gs://, file://, memory://), committed by a manifest.

Layout: RUN/checkpoints/step-000000123/ holds one DCP checkpoint (each rank writes its share) and, written last by
rank 0 once every rank's objects are stored, `manifest.json`: step, epoch, position inside the epoch, world size,
versions, the GradScaler state, the resolved spec, and every object with its size and CRC32. A prefix without a
valid manifest is not a checkpoint: it is reported, skipped, and deleted once a newer checkpoint is committed.

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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from service import dcp_io
from service.distributed import Worker, new_cpu_group
from service.spec import CheckpointSpec, StorageSpec
from service.storage import check_writable, explain, filesystem, fsspec_options, retry

log = logging.getLogger("barlow")

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


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


def inspect_checkpoint(url: str, storage: StorageSpec) -> CheckpointInfo:
    """Read one checkpoint's manifest and check that every object it lists is stored with its size."""
    fs, path = filesystem(url, storage)
    step = int(path.rstrip("/").rsplit("step-", 1)[-1]) if "step-" in path else -1
    try:
        stored = {entry["name"].rsplit("/", 1)[-1]: entry["size"] for entry in fs.ls(path, detail=True, refresh=True)}
    except FileNotFoundError:
        return CheckpointInfo(url, step, None, "does not exist")
    if MANIFEST not in stored:
        return CheckpointInfo(url, step, None, "no manifest: an incomplete save")
    try:
        manifest = json.loads(fs.cat_file(f"{path.rstrip('/')}/{MANIFEST}"))
        objects = manifest["objects"]
    except (ValueError, KeyError, TypeError) as error:
        return CheckpointInfo(url, step, None, f"unreadable manifest ({error})")
    for obj in objects:
        if stored.get(obj["name"]) != obj["size"]:
            return CheckpointInfo(url, step, manifest, f"object {obj['name']} is missing or has the wrong size")
    return CheckpointInfo(url, manifest["step"], manifest)


def list_checkpoints(run_url: str, storage: StorageSpec) -> list[CheckpointInfo]:
    """Every checkpoint prefix under the run, valid or not, oldest first."""
    root = checkpoints_url(run_url)
    fs, path = filesystem(root, storage)
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    names = sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry["type"] == "directory")
    return [inspect_checkpoint(f"{root}/{name}", storage) for name in names if name.startswith("step-")]


def _copy_to_host(tree):
    """A deep copy whose tensors live in host memory, so training can go on mutating the originals."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {key: _copy_to_host(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_copy_to_host(value) for value in tree)
    return tree


class CheckpointManager:
    """Saves and restores a run's training state: model, optimizer, GradScaler and the position in the data."""

    def __init__(self, *, run_url: str, spec: CheckpointSpec, storage: StorageSpec, worker: Worker,
                 model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 steps_per_epoch: int, resolved_spec: dict, model_section: str = "model"):
        self.run_url = run_url
        self.spec = spec
        self.storage = storage
        self.worker = worker
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.steps_per_epoch = steps_per_epoch
        self.resolved_spec = resolved_spec
        self.model_section = model_section  # the spec section that defines the saved network
        self.root = checkpoints_url(run_url)
        check_writable(self.root, storage)
        self.group = new_cpu_group()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.pending: Future | None = None
        self.last_saved_step: int | None = None
        self.committed: list[int] = []
        self.failed: list[int] = []

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

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        """Await the last save."""
        self.wait()
        self.executor.shutdown()

    def _write(self, step: int, staged: dict, state: dict) -> None:
        url = f"{self.root}/{checkpoint_name(step)}"
        started = time.monotonic()
        options = fsspec_options(url, self.storage)
        try:
            objects = dcp_io.save(staged, url, options, self.group)
            everyone = [None] * self.worker.world_size if self.worker.is_main else None
            if self.group is not None:
                dist.gather_object(objects, everyone, dst=0, group=self.group)
            else:
                everyone = [objects]
            if self.worker.is_main:
                self._commit(url, state, everyone)
        except (Exception, dcp_io.CheckpointException) as error:  # CheckpointException is a BaseException
            self.failed.append(step)
            log.error("checkpoint at step %d failed, training goes on and the previous checkpoint stays valid: %s",
                      step, explain(url, error))
            return
        self.committed.append(step)
        if self.worker.is_main:
            log.info("checkpoint %s committed in %.1f s", url, time.monotonic() - started)
            try:
                self._apply_retention()
            except Exception as error:  # noqa: BLE001 - deleting old checkpoints may wait for the next save
                log.warning("could not delete old checkpoints now: %s", explain(self.root, error))

    def _commit(self, url: str, state: dict, rank_objects: list[dict]) -> None:
        objects = {name: info for per_rank in rank_objects for name, info in per_rank.items()}
        manifest = dict(
            format=FORMAT_VERSION,
            **state,
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
        checkpoints = list_checkpoints(self.run_url, self.storage)
        valid = [c for c in checkpoints if c.valid]
        if not valid:
            return
        keep = {c.step for c in valid[-self.spec.keep_last:]}
        if self.spec.keep_every_epochs:
            keep |= {c.step for c in valid if c.manifest["batch_in_epoch"] == 0 and c.epoch > 0
                     and c.epoch % self.spec.keep_every_epochs == 0}
        newest = valid[-1].step
        for checkpoint in checkpoints:
            if checkpoint.step < newest and checkpoint.step not in keep:
                fs, path = filesystem(checkpoint.url, self.storage)
                fs.rm(path, recursive=True)
                log.info("deleted %s checkpoint %s", "old" if checkpoint.valid else "incomplete", checkpoint.url)

    def restore(self) -> int:
        """Load the checkpoint the spec's `resume` asks for; returns the number of completed steps (0: fresh).

        Incomplete saves newer than the chosen checkpoint are leftovers of a run that died; they are deleted
        before training, since this run will save those steps again.
        """
        checkpoints = list_checkpoints(self.run_url, self.storage)
        if self.spec.resume == "none":
            if checkpoints:
                raise CheckpointError(
                    f"{self.root} already holds checkpoints and checkpoint.resume=none: choose another run.output, "
                    "delete them, or resume with checkpoint.resume=auto"
                )
            return 0
        if self.spec.resume == "auto":
            for checkpoint in checkpoints:
                if not checkpoint.valid:
                    log.warning("ignoring %s: %s", checkpoint.url, checkpoint.problem)
            valid = [c for c in checkpoints if c.valid]
            chosen = valid[-1] if valid else None
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
        start = chosen.step if chosen else 0
        if self.worker.is_main:
            for checkpoint in checkpoints:
                if checkpoint.step >= start and not checkpoint.valid:
                    fs, path = filesystem(checkpoint.url, self.storage)
                    fs.rm(path, recursive=True)
        if self.group is not None:
            dist.barrier(group=self.group)
        if chosen is None:
            log.info("no checkpoint under %s: starting fresh", self.root)
            return 0
        self._check_compatible(chosen)
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp_io.load(state, chosen.url, fsspec_options(chosen.url, self.storage), self.group)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        if self.scaler.is_enabled() and chosen.manifest["scaler"]:
            self.scaler.load_state_dict(chosen.manifest["scaler"])
        self.last_saved_step = chosen.step
        log.info("resumed from %s: step %d (epoch %d, batch %d of %d)", chosen.url, chosen.step,
                 chosen.epoch, chosen.manifest["batch_in_epoch"], self.steps_per_epoch)
        return chosen.step

    def _check_compatible(self, checkpoint: CheckpointInfo) -> None:
        theirs = checkpoint.manifest["spec"].get(self.model_section)
        ours = self.resolved_spec[self.model_section]
        if theirs != ours:
            raise CheckpointError(
                f"{checkpoint.url} holds a different model ({theirs}) from this run's spec ({ours}): use a spec "
                f"with the same {self.model_section} section, another run.output, or checkpoint.resume=none"
            )
        if checkpoint.manifest["steps_per_epoch"] != self.steps_per_epoch:
            raise CheckpointError(
                f"{checkpoint.url} was made with {checkpoint.manifest['steps_per_epoch']} steps per epoch, this run "
                f"has {self.steps_per_epoch}: keep optim.batch_size and the data set of the run to resume it"
            )

