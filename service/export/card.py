"""What an exported folder says about its model: config.json (for programs) and README.md (the model card, for people).

config.json follows timm's convention for a model folder (`architecture`, `num_features`, `pretrained_cfg` with the
input size, interpolation, crop and normalisation), so that timm's own tools read what they need, and keeps this
service's facts under `barlow_twins`. Every string that came from storage (the run's location, an evaluation's) is
shown in the card inside a code span it cannot leave.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from service.checkpoint.export import FOLDER_WEIGHTS
from service.method.model import BACKBONE_FEATURES
from service.spec import TrainSpec

CONFIG_VERSION = 1
# the reference (facebookresearch/barlowtwins) says in its README: "This project is under the CC-BY-NC 4.0 license"
REFERENCE_LICENCE = "CC BY-NC 4.0"
PAPER = "Zbontar et al., Barlow Twins: Self-Supervised Learning via Redundancy Reduction, ICML 2021"


@dataclass
class Evaluation:
    """A `barlow evaluate` result found beside the run, for this run's backbone."""

    output: str
    mode: str
    acc1: float
    acc5: float
    epochs: int
    train_images: int


@dataclass
class ModelFacts:
    """Everything the config and the card state, gathered by the export."""

    spec: TrainSpec
    source: str  # the checkpoint exported
    step: int
    epoch: int | None
    total_steps: int | None
    created: str | None
    spec_digest: str
    train_images: int | None  # as the run's start event recorded it
    world_sizes: list[int] = field(default_factory=list)
    knn: dict[str, Any] | None = None  # the newest kNN monitor line
    evaluations: list[Evaluation] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name: {"bytes", "sha256", "holds"}
    onnx_max_difference: float | None = None
    with_projector: bool = False


def shown(text: Any) -> str:
    """`text` as a Markdown code span on one line, whatever it holds: backticks and line breaks replaced, and a pipe
    escaped (GitHub's tables split cells at a pipe even inside a code span)."""
    return "`" + " ".join(str(text).replace("`", "'").split())[:300].replace("|", "\\|") + "`"


def model_config(facts: ModelFacts) -> dict[str, Any]:
    spec = facts.spec
    size = spec.data.image_size
    return {
        "architecture": spec.model.backbone,
        "num_classes": 0,  # a feature extractor: no fc
        "num_features": BACKBONE_FEATURES[spec.model.backbone],
        "global_pool": "avg",
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "interpolation": "bilinear",
            "crop_pct": 224 / 256,  # the reference's evaluation: resize to 256/224 of the size, centre crop
            "crop_mode": "center",
            "mean": list(spec.augment.mean),
            "std": list(spec.augment.std),
            "num_classes": 0,
            "first_conv": "conv1",
            "classifier": "fc",
        },
        "barlow_twins": {
            "config_version": CONFIG_VERSION,
            "library": "torchvision",
            "architecture": spec.model.backbone,
            "stem": spec.model.stem,
            "feature_dim": BACKBONE_FEATURES[spec.model.backbone],
            "projector": {"sizes": [BACKBONE_FEATURES[spec.model.backbone], *spec.model.projector_sizes],
                          "included": facts.with_projector},
            "recipe": {
                "epochs": spec.optim.epochs, "batch_size": spec.optim.batch_size,
                "optimizer": spec.optim.optimizer, "lr_weights": spec.optim.lr_weights,
                "lr_biases": spec.optim.lr_biases, "weight_decay": spec.optim.weight_decay,
                "warmup_epochs": spec.optim.warmup_epochs, "lambd": spec.loss.lambd,
                "scale_loss": spec.loss.scale_loss, "precision": spec.run.precision, "seed": spec.run.seed,
            },
            "data": {"dataset": spec.data.dataset, "train_images": facts.train_images, "image_size": size},
            "checkpoint": {"url": facts.source, "step": facts.step, "epoch": facts.epoch,
                           "total_steps": facts.total_steps, "created": facts.created},
            "spec_sha256": facts.spec_digest,
            "knn_monitor": facts.knn,
            "evaluations": [vars(evaluation) for evaluation in facts.evaluations],
            "onnx_max_difference": facts.onnx_max_difference,
            "files": facts.files,
        },
    }


def _percent(value: float) -> str:
    return f"{value:.2f} %" if math.isfinite(value) else "-"


def model_card(facts: ModelFacts) -> str:
    """The folder's README.md."""
    spec = facts.spec
    arch, stem, size = spec.model.backbone, spec.model.stem, spec.data.image_size
    features = BACKBONE_FEATURES[arch]
    trained = (f"step {facts.step} of {facts.total_steps}" if facts.total_steps else f"step {facts.step}") + (
        f" (epoch {facts.epoch} of {spec.optim.epochs})" if facts.epoch is not None else "")
    images = f"{facts.train_images:,} training images" if facts.train_images else "training images not recorded"
    weights = next((name for name in facts.files if name.endswith((".safetensors", ".pth"))
                    and not name.startswith("projector")), None)
    stem_lines = ("" if stem == "imagenet" else
                  "model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)  "
                  "# the CIFAR stem\nmodel.maxpool = torch.nn.Identity()\n")
    load = (f"from safetensors.torch import load_file\nstate = load_file(\"{FOLDER_WEIGHTS}\")"
            if weights == FOLDER_WEIGHTS else f"state = torch.load(\"{weights}\", weights_only=True)")
    lines = [
        "---",
        "library_name: timm",
        "tags: [barlow-twins, self-supervised, image-feature-extraction, torchvision]",
        "pipeline_tag: image-feature-extraction",
        "---",
        "",
        f"# Barlow Twins {arch} ({stem} stem)",
        "",
        f"A {arch} backbone pretrained without labels by Barlow Twins ({PAPER}), trained by barlowtwins-service. "
        f"It maps a 3 x {size} x {size} image, normalised with mean {list(spec.augment.mean)} and std "
        f"{list(spec.augment.std)}, to {features} features (the global average pool; no classifier: `fc` is not "
        f"in the weights). Key names are torchvision's.",
        "",
        "## Training",
        "",
        "| | |",
        "| --- | --- |",
        f"| data | {shown(spec.data.dataset)}, {images}, {size} px crops |",
        f"| checkpoint | {shown(facts.source)}, {trained}, written {shown(facts.created or '-')} |",
        f"| recipe | LARS, {spec.optim.epochs} epoch{'s' if spec.optim.epochs != 1 else ''}, global batch "
        f"{spec.optim.batch_size}, learning rates "
        f"{spec.optim.lr_weights:g} (weights) and {spec.optim.lr_biases:g} (biases and BatchNorm) x batch / 256, "
        f"weight decay {spec.optim.weight_decay:g}, {spec.optim.warmup_epochs:g} warm-up epochs, lambda "
        f"{spec.loss.lambd:g}, loss scale {spec.loss.scale_loss:g}, {spec.run.precision} |",
        f"| projector | {'-'.join(str(s) for s in [features, *spec.model.projector_sizes])}"
        f"{' (included: projector file)' if facts.with_projector else ' (not included)'} |",
        f"| workers | {', '.join(str(w) for w in facts.world_sizes) or '-'} (per attempt) |",
        f"| spec | sha256 {facts.spec_digest} |",
        "",
        "## Evaluation",
        "",
    ]
    if facts.knn is None and not facts.evaluations:
        lines.append("The run recorded no evaluation (its kNN monitor was off, and no `barlow evaluate` result was "
                     "found beside it).")
    if facts.knn is not None:
        knn = facts.knn
        rank = (f"; RankMe {knn['rankme']:.1f} over {knn.get('rankme_sample', '?')} images (the effective rank of "
                f"the features: at most {features} and the sample)") if knn.get("rankme") is not None else ""
        lines.append(f"- kNN monitor during training (weighted kNN, k={spec.monitor.knn_k}, "
                     f"T={spec.monitor.knn_temperature:g}, on the held-out split): top-1 "
                     f"{_percent(knn['knn_top1'])} after epoch {knn['epoch'] + 1 if 'epoch' in knn else '?'}{rank}.")
    for evaluation in facts.evaluations:
        lines.append(f"- `barlow evaluate` ({shown(evaluation.mode)}, {evaluation.epochs} epochs, "
                     f"{evaluation.train_images:,} training images), in {shown(evaluation.output)}: top-1 "
                     f"{_percent(evaluation.acc1)}, top-5 {_percent(evaluation.acc5)}.")
    lines += [
        "",
        "## Files",
        "",
        "| file | holds | bytes | sha256 |",
        "| --- | --- | --- | --- |",
        *(f"| `{name}` | {info['holds']} | {info['bytes']:,} | {info['sha256']} |"
          for name, info in facts.files.items()),
        "| `config.json` | the architecture, input and recipe for programs (timm's keys and `barlow_twins`) | | |",
        "",
        "## Loading",
        "",
    ]
    if weights is not None:
        lines += [
            "torchvision:",
            "",
            "```python",
            "import torch, torchvision",
            load,
            f"model = torchvision.models.{arch}()",
            "model.fc = torch.nn.Identity()",
            stem_lines + "model.load_state_dict(state)",
            "model.eval()",
            "```",
            "",
            "timm (`pip install timm`):",
            "",
            "```python",
            "import timm, torch",
            load,
            f"model = timm.create_model(\"{arch}\", pretrained=False, num_classes=0)",
            stem_lines + "model.load_state_dict(state)",
            "model.eval()",
            "```",
            "",
            "This service: `barlow evaluate` takes the folder or the file as `backbone.weights`; torch.hub: "
            f"`torch.hub.load(REPO_DIR, \"{arch}\", source=\"local\", weights=\"{weights}\")`.",
            "",
        ]
    if "model.onnx" in facts.files:
        lines += [
            f"ONNX (`onnxruntime`): input `images` (batch x 3 x {size} x {size}, the batch dimension dynamic), "
            f"output `features` (batch x {features}); checked against PyTorch before it was written: largest "
            f"difference {facts.onnx_max_difference:.3g}.",
            "",
            "```python",
            "import onnxruntime",
            "session = onnxruntime.InferenceSession(\"model.onnx\")",
            "(features,) = session.run([\"features\"], {\"images\": images})  # float32 numpy, normalised",
            "```",
            "",
        ]
    lines += [
        "## Licence",
        "",
        f"The method and its reference implementation (facebookresearch/barlowtwins) are under {REFERENCE_LICENCE}; "
        "these weights were trained by this service's re-implementation on the data named above: their use is "
        "bound by that data set's licence and your own terms, not by the reference's published weights.",
        "",
    ]
    return "\n".join(lines)
