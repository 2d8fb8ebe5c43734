"""What a run's checkpoints are, read as anyone may have written them: names, manifests, and their checks.

Layout (service/run/layout.py): RUN/checkpoints/step-000000123/ holds one DCP checkpoint (each rank writes its
share) and, written last by rank 0 once every rank's objects are stored, `manifest.json`: step, epoch, position
inside the epoch, world size, run and job ids, versions, the GradScaler state, the resolved spec, the recipe changes
allowed so far, and every object with its size and CRC32. A prefix without a valid manifest is not a checkpoint: it
is reported, skipped, and deleted once a newer checkpoint is committed.

Nothing is trusted unread: a manifest is read with a size limit and checked in type and in its object names;
`verify_checkpoint` reads every object against it, and the DCP metadata with the restricted unpickler a load uses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config
from typing_extensions import NotRequired, TypedDict

from service.checkpoint import dcp_io
from service.checkpoint.dcp_io import CorruptCheckpoint
from service.run.layout import CHECKPOINT_NAME, checkpoint_step, checkpoints_url
from service.spec import StorageSpec
from service.storage.filesystem import filesystem
from service.storage.untrusted import MiB, UntrustedObject, parse_json, read_bounded

MANIFEST = "manifest.json"
MANIFEST_LIMIT = 16 * MiB  # ~10 KB for one worker, ~100 B more per worker: room for 100,000 and the spec
FORMAT_VERSION = 1


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
