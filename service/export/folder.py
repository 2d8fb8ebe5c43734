"""`barlow export SOURCE DEST`: a training run's (or checkpoint's) backbone as a model folder.

The folder holds the weights in the forms asked for (`model.safetensors`, `<backbone>.pth`, `model.onnx`), the
projector beside them when asked, `config.json` and the model card `README.md`. It is written whole or not at all:
on a local disk into a hidden sibling folder renamed to DEST at the end; on an object store (no rename there) object
by object with the card last, so that a folder with a README.md is complete. DEST must not hold anything yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.checkpoint.export import (
    FOLDER_CARD,
    FOLDER_CONFIG,
    FOLDER_WEIGHTS,
    SAFETENSORS,
    backbone_state_dict,
    checkpoint_model,
    newest_checkpoint,
    weights_bytes,
)
from service.errors import CheckpointError, StorageError
from service.export.card import Evaluation, ModelFacts, model_card, model_config
from service.export.onnx_model import ONNX_NAME, export_onnx, require_onnx  # optional packages: imported when asked
from service.reports.run_log import read_run_log
from service.run import layout
from service.spec import MAX_SPEC_BYTES, StorageSpec, TrainSpec, safe_yaml, spec_digest, spec_to_yaml
from service.storage.filesystem import explain, filesystem, is_remote, storage_errors
from service.storage.untrusted import KiB, UntrustedObject, parse_json, read_bounded

log = logging.getLogger("barlow")

FORMATS = ("safetensors", "pth", "onnx")
MAX_EVALUATIONS = 20  # sibling folders named after the run looked into for an evaluation's results.json
MAX_RESULTS_BYTES = 64 * KiB
EVALUATION_MODES = ("linear", "finetune", "knn")
KNN_FIELDS = ("epoch", "step", "knn_top1", "rankme", "rankme_sample")


@dataclass(frozen=True)
class ExportedFolder:
    dest: str
    checkpoint: str
    files: list[str]
    onnx_max_difference: float | None


def checkpoint_to_export(source: str, storage: StorageSpec) -> str:
    """`source` when it names a checkpoint, else the newest valid checkpoint of the run at `source`."""
    checkpoint = newest_checkpoint(source, storage)
    if checkpoint is None:
        raise CheckpointError(f"{source} holds no valid checkpoint to export: name a run's output (run.output) or "
                              "one of its checkpoints (barlow checkpoints ls RUN)")
    return checkpoint


def export_folder(source: str, dest: str, storage: StorageSpec, formats: tuple[str, ...] = ("safetensors",),
                  with_projector: bool = False) -> ExportedFolder:
    """Write the model folder of `source` (a run or a checkpoint) to `dest` (see the module's docstring)."""
    dest = dest.rstrip("/")
    if "onnx" in formats:
        require_onnx()  # a missing optional package is said before anything is read
    _require_empty(dest, storage)
    checkpoint = checkpoint_to_export(source, storage)
    model, manifest = checkpoint_model(checkpoint, storage)
    try:
        spec = TrainSpec.model_validate(manifest["spec"])
    except ValidationError as error:  # a manifest from storage: another version's, or planted
        raise CheckpointError(f"{checkpoint}: its manifest's spec is not a training spec this version reads "
                              f"({error.error_count()} problem(s), the first at "
                              f"{'.'.join(map(str, error.errors()[0]['loc']))})") from None
    run = checkpoint.rsplit(f"/{layout.CHECKPOINTS}/", 1)[0]
    facts = _facts(spec, checkpoint, manifest, run, storage, with_projector)
    files: dict[str, bytes] = {}
    backbone = backbone_state_dict(model)
    weight_formats = [name for name in formats if name != "onnx"] or ["safetensors"]  # ONNX alone: PyTorch's too
    if "safetensors" in weight_formats:
        files[FOLDER_WEIGHTS] = weights_bytes(backbone, SAFETENSORS)
    if "pth" in weight_formats:
        files[layout.weights_name(spec.model.backbone)] = weights_bytes(backbone, ".pth")
    if with_projector:
        projector = {key: value.detach().cpu().clone() for key, value in model.projector.state_dict().items()}
        suffix = SAFETENSORS if "safetensors" in weight_formats else ".pth"
        files[f"projector{suffix}"] = weights_bytes(projector, suffix)
    if "onnx" in formats:
        exported = export_onnx(model.backbone, spec.data.image_size)  # on the CPU, its fc already the identity
        files[ONNX_NAME] = exported.data
        facts.onnx_max_difference = exported.max_difference
    facts.files = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "holds": _holds(name)}
                   for name, data in files.items()}
    files[FOLDER_CONFIG] = (json.dumps(model_config(facts), indent=1) + "\n").encode()
    files[FOLDER_CARD] = model_card(facts).encode()  # last: on an object store, its presence says the folder is whole
    _write_whole(dest, files, storage)
    return ExportedFolder(dest, checkpoint, list(files), facts.onnx_max_difference)


def _holds(name: str) -> str:
    if name == ONNX_NAME:
        return "the backbone as ONNX (features out)"
    if name.startswith("projector"):
        return "the projector (Linear-BatchNorm-ReLU layers, then Linear), keys of nn.Sequential"
    return "the backbone's state_dict, torchvision key names, no fc"


def _facts(spec: TrainSpec, checkpoint: str, manifest: dict[str, Any], run: str, storage: StorageSpec,
           with_projector: bool) -> ModelFacts:
    run_log = read_run_log(run, storage)
    starts = run_log.starts if run_log else []
    knn = {key: run_log.knn[-1][key] for key in KNN_FIELDS if key in run_log.knn[-1]} if (
        run_log and run_log.knn) else None
    return ModelFacts(
        spec=spec, source=checkpoint, step=int(manifest.get("step", layout.checkpoint_step(checkpoint) or 0)),
        epoch=manifest.get("epoch"), total_steps=starts[-1].get("total_steps") if starts else None,
        created=manifest.get("created"), spec_digest=spec_digest(spec_to_yaml(spec)),
        train_images=next((s["train_images"] for s in reversed(starts) if "train_images" in s), None),
        world_sizes=[s["world_size"] for s in starts if isinstance(s.get("world_size"), int)],
        knn=knn, evaluations=evaluations_beside(run, storage), with_projector=with_projector)


def _same_place(a: str, b: str) -> bool:
    """Whether two locations name the same run (local paths compared absolute)."""
    if not is_remote(a) and not is_remote(b):
        return os.path.abspath(a) == os.path.abspath(b)
    return a.rstrip("/") == b.rstrip("/")


def _names_run(weights: Any, run: str) -> bool:
    """Whether an evaluation's backbone.weights is the run or something in it (its export, a checkpoint)."""
    if not isinstance(weights, str):
        return False
    while weights.rstrip("/"):
        if _same_place(weights, run):
            return True
        parent = weights.rstrip("/").rsplit("/", 1)[0]
        if parent == weights.rstrip("/"):
            return False
        weights = parent
    return False


def evaluations_beside(run: str, storage: StorageSpec) -> list[Evaluation]:
    """The results of `barlow evaluate` runs beside the run, in folders named after it (runs/digits-linear for
    runs/digits, as the specs name them), whose spec's backbone.weights is the run or in it. What these folders hold
    is read as untrusted: bounded, and kept only when of the form `barlow evaluate` writes."""
    if "/" not in run:
        return []
    parent, name = run.rsplit("/", 1)
    fs, parent_path = filesystem(parent, storage)
    try:
        siblings = sorted(path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(parent_path, detail=False))
    except FileNotFoundError:
        return []
    found = []
    for sibling in [s for s in siblings if s.startswith(f"{name}-")][:MAX_EVALUATIONS]:
        folder = f"{parent}/{sibling}"
        try:
            spec = safe_yaml(read_bounded(fs, f"{parent_path}/{sibling}/{layout.SPEC}", MAX_SPEC_BYTES, "spec"),
                             layout.under(folder, layout.SPEC))
            results = parse_json(read_bounded(fs, f"{parent_path}/{sibling}/{layout.RESULTS}", MAX_RESULTS_BYTES,
                                              "results.json"), layout.under(folder, layout.RESULTS))
        except (FileNotFoundError, IsADirectoryError, ValueError, UntrustedObject):
            continue  # not an evaluation's folder, or not one of the form it writes
        backbone = spec.get("backbone") if isinstance(spec, dict) else None
        if isinstance(backbone, dict) and _names_run(backbone.get("weights"), run) and (
                evaluation := _evaluation(folder, results)) is not None:
            found.append(evaluation)
    return found


def _evaluation(folder: str, results: Any) -> Evaluation | None:
    if not isinstance(results, dict) or results.get("mode") not in EVALUATION_MODES:
        return None
    acc1, acc5, epochs, images = (results.get(key) for key in ("acc1", "acc5", "epochs", "train_images"))
    accuracies = [float(a) for a in (acc1, acc5) if isinstance(a, (int, float)) and math.isfinite(a) and 0 <= a <= 100]
    counts = [c for c in (epochs, images) if type(c) is int and 0 <= c < 2**53]
    if len(accuracies) < 2 or len(counts) < 2:
        return None
    return Evaluation(folder, results["mode"], accuracies[0], accuracies[1], counts[0], counts[1])


def _require_empty(dest: str, storage: StorageSpec) -> None:
    fs, path = filesystem(dest, storage)
    try:
        held = fs.exists(path) and (not fs.isdir(path) or bool(fs.ls(path, detail=False)))
    except storage_errors() as error:
        raise StorageError(explain(dest, error)) from None
    if held:
        raise StorageError(f"{dest} already holds something: export to a new folder (nothing was written)")


def _write_whole(dest: str, files: dict[str, bytes], storage: StorageSpec) -> None:
    fs, path = filesystem(dest, storage)
    if not is_remote(dest):
        target = Path(path)
        partial = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            partial.mkdir(parents=True)
            for name, data in files.items():
                (partial / name).write_bytes(data)
            if target.is_dir():  # an empty folder (checked): replaced by the whole one
                target.rmdir()
            partial.rename(target)
        except OSError as error:
            shutil.rmtree(partial, ignore_errors=True)
            raise StorageError(explain(dest, error)) from None
        return
    written = []
    try:
        for name, data in files.items():  # the card last (the dict's order)
            fs.pipe_file(f"{path}/{name}", data)
            written.append(f"{path}/{name}")
    except storage_errors() as error:
        for done in written:  # no half folder left behind: the objects written so far are removed
            try:
                fs.rm_file(done)
            except storage_errors():
                log.warning("could not remove %s after the failed export", done)
        raise StorageError(explain(dest, error)) from None
