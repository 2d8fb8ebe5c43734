"""The exported backbone: a torchvision ResNet state_dict without `fc.*`, as the reference's resnet50.pth, in either
file form: torch.save's `.pth` (the reference's) or `.safetensors` (tensors only: reading one runs no code); and
reading it back from a file, a model folder `barlow export` wrote (service/export/), a checkpoint or a run.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
from typing import Any, get_args

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from service.checkpoint.catalog import inspect_checkpoint, list_checkpoints
from service.checkpoint.dcp_io import CorruptCheckpoint, load
from service.errors import CheckpointError
from service.method.model import BarlowTwins
from service.run import layout
from service.spec import ModelSpec, StorageSpec, TrainSpec
from service.storage.filesystem import filesystem, fsspec_options, open_for_writing
from service.storage.untrusted import KiB, UntrustedObject, parse_json, read_bounded

SAFETENSORS = ".safetensors"
WEIGHT_SUFFIXES = (".pth", ".pt", SAFETENSORS)
# a model folder `barlow export` writes: config.json marks it and records each file's sha256; the card comes last
FOLDER_CONFIG, FOLDER_CARD, FOLDER_WEIGHTS = "config.json", "README.md", "model.safetensors"
MAX_CONFIG_BYTES = 256 * KiB  # a few KB: the recipe, the files, the evaluations
BACKBONES: tuple[str, ...] = get_args(ModelSpec.model_fields["backbone"].annotation)


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights with torchvision key names, on the CPU, whatever wraps the model (DDP, compile)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        inner = getattr(model, "module", None) or model._orig_mod
        assert isinstance(inner, nn.Module)  # DDP's module, torch.compile's original module
        model = inner
    backbone = model.backbone
    assert isinstance(backbone, nn.Module)
    return {key: value.detach().cpu().clone() for key, value in backbone.state_dict().items()}


def weights_bytes(state: dict[str, torch.Tensor], name: str) -> bytes:
    """A state_dict serialised as a file named `name` holds it: safetensors for `.safetensors`, torch.save else."""
    if name.endswith(SAFETENSORS):
        return safetensors.torch.save({key: value.contiguous() for key, value in state.items()})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def write_backbone(state: dict[str, torch.Tensor], url: str, storage: StorageSpec) -> None:
    """Save a backbone state_dict to a path or URL, in the form its suffix names; a failure is a StorageError
    naming the URL."""
    with open_for_writing(url, storage) as file:
        file.write(weights_bytes(state, url))


def exported_weights_url(spec: TrainSpec) -> str:
    """Where a training run exports its backbone: `<run.output>/<backbone>.pth`."""
    return layout.under(spec.run.output, layout.weights_name(spec.model.backbone))


def export_backbone(model: nn.Module, spec: TrainSpec) -> str:
    """Write `<backbone>.pth` into the run's output (its spec.yaml was written when the run started); returns the
    weights' URL."""
    url = exported_weights_url(spec)
    write_backbone(backbone_state_dict(model), url, spec.storage)
    return url


def checkpoint_backbone(checkpoint_url: str, storage: StorageSpec) -> dict[str, torch.Tensor]:
    """The backbone of a training checkpoint, read without a process group."""
    return backbone_state_dict(checkpoint_model(checkpoint_url, storage)[0])


def checkpoint_model(checkpoint_url: str, storage: StorageSpec) -> tuple[BarlowTwins, dict[str, Any]]:
    """The whole model of a training checkpoint (backbone and projector) and the checkpoint's manifest, read
    without a process group."""
    checkpoint = inspect_checkpoint(checkpoint_url, storage)
    if not checkpoint.valid:
        raise CheckpointError(f"{checkpoint_url} cannot be read: {checkpoint.problem}")
    assert checkpoint.manifest is not None  # a valid checkpoint has one
    model = BarlowTwins(ModelSpec.model_validate(checkpoint.manifest["spec"]["model"]))
    state = {"model": model.state_dict()}
    try:  # every object is checked against the manifest as it is read: a corrupt checkpoint is never exported
        load(state, checkpoint.url, checkpoint.objects, fsspec_options(checkpoint.url, storage))
    except CorruptCheckpoint as error:
        raise CheckpointError(f"{checkpoint_url} is corrupt: {error}") from None
    model.load_state_dict(state["model"])
    return model, checkpoint.manifest


def export_checkpoint(checkpoint_url: str, output_url: str, storage: StorageSpec) -> dict[str, torch.Tensor]:
    """Write the backbone of a training checkpoint to `output_url`, without a process group; returns it."""
    backbone = checkpoint_backbone(checkpoint_url, storage)
    write_backbone(backbone, output_url, storage)
    return backbone


def read_weights(url: str, storage: StorageSpec, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """A state_dict from a path or URL: a `.safetensors` file, or one saved with torch.save (tensors only:
    weights_only). A file of neither form, or whose bytes do not have the `sha256` given, is a CheckpointError
    naming it."""
    fs, path = filesystem(url, storage)
    try:
        with fs.open(path, "rb") as file:
            data = file.read()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise CheckpointError(f"{url} does not have the sha256 its folder's config.json records: damaged or "
                                  "replaced since it was exported")
        if url.endswith(SAFETENSORS):
            return safetensors.torch.load(data)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"backbone weights {url} do not exist") from None
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError) as error:
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{url} is not a weights file: {first_line[:200]}") from None


def exported_folder(folder: str, storage: StorageSpec) -> tuple[str, str] | None:
    """(the weights file's URL, its sha256 as config.json records it) of a folder `barlow export` wrote:
    model.safetensors, else the `.pth` named after the architecture; None when `folder` has no config.json. What
    the folder holds is read as others may have written it: config.json bounded, the weights' names this module's
    own, never config.json's. The sha256 catches damage (a cut upload, a changed byte), not a writer, who can
    rewrite config.json too; a folder without its card, written last, is an export that did not finish."""
    fs, path = filesystem(folder, storage)
    if not fs.exists(f"{path}/{FOLDER_CONFIG}"):
        return None
    if not fs.exists(f"{path}/{FOLDER_CARD}"):
        raise CheckpointError(f"{folder}: an export that did not finish (no {FOLDER_CARD}, which is written last): "
                              "export it again")
    where = layout.under(folder, FOLDER_CONFIG)
    try:
        config = parse_json(read_bounded(fs, f"{path}/{FOLDER_CONFIG}", MAX_CONFIG_BYTES, "model folder's config"),
                            where)
    except UntrustedObject as error:
        raise CheckpointError(str(error)) from None
    facts = config.get("barlow_twins") if isinstance(config, dict) else None
    files = facts.get("files") if isinstance(facts, dict) else None
    for name in (FOLDER_WEIGHTS, *(f"{arch}.pth" for arch in BACKBONES)):
        if fs.exists(f"{path}/{name}"):
            record = files.get(name) if isinstance(files, dict) else None
            digest = record.get("sha256") if isinstance(record, dict) else None
            if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
                raise CheckpointError(f"{where} records no sha256 for {name}: not a folder barlow export wrote")
            return layout.under(folder, name), digest
    raise CheckpointError(f"{folder} holds a config.json but no weights file (model.safetensors or <backbone>.pth)")


def newest_checkpoint(source: str, storage: StorageSpec) -> str | None:
    """`source` when it names a checkpoint, else the newest valid checkpoint of the run at `source` (None: none)."""
    source = source.rstrip("/")
    if layout.checkpoint_step(source) is not None:
        return source
    valid = [c for c in list_checkpoints(source, storage) if c.valid]
    return valid[-1].url if valid else None


def load_pretrained(source: str, storage: StorageSpec) -> dict[str, torch.Tensor]:
    """Backbone weights from an exported file (.safetensors, .pth), a folder `barlow export` wrote, a training
    checkpoint, or a training run (its newest checkpoint)."""
    if source.rstrip("/").endswith(WEIGHT_SUFFIXES):
        return read_weights(source, storage)
    if (exported := exported_folder(source.rstrip("/"), storage)) is not None:
        weights, sha256 = exported
        return read_weights(weights, storage, sha256)
    checkpoint = newest_checkpoint(source, storage)
    if checkpoint is None:
        raise CheckpointError(f"{source} is neither a weights file (.safetensors, .pth), a folder barlow export wrote "
                              "nor a checkpoint, and holds no valid checkpoint")
    return checkpoint_backbone(checkpoint, storage)
