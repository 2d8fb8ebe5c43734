"""The spec of an evaluation (`barlow evaluate`): the backbone, the labelled data and the protocol, each unset
hyper-parameter taking the reference's value for the mode (reference `evaluate.py`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from service.spec.job import JobSpec
from service.spec.sections import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AutoCount0,
    AutoCount1,
    CheckpointSpec,
    Location,
    RunSpec,
    Section,
    StorageSpec,
)


class BackboneSpec(Section):
    """The network under evaluation."""

    weights: Location | None = Field(
        None, description="An exported backbone (`model.safetensors` or `resnet50.pth`-style, path or URL), a folder "
        "`barlow export` wrote, a training checkpoint "
        "(…/checkpoints/step-000000123) or a training run's `run.output` (its newest valid checkpoint). Unset: the "
        "architecture randomly initialised, as a baseline."
    )
    arch: Literal["resnet18", "resnet34", "resnet50"] = Field("resnet50", description="torchvision ResNet.")
    stem: Literal["imagenet", "cifar"] = Field("imagenet", description="As `model.stem` of the pretraining.")


class EvalDataSpec(Section):
    """The labelled data: `train` to fit the classifier on, the held-out split to report."""

    dataset: Literal["imagefolder", "cifar10", "digits", "shards"] = Field(
        "imagefolder", description="As `data.dataset`; imagefolder and shards read `train/` and `val/`."
    )
    path: Location | None = Field(None, description="As `data.path`.")
    cache: Location | None = Field(None, description="As `data.cache`.")
    cache_max_gb: float = Field(100.0, gt=0, description="As `data.cache_max_gb`.")
    image_size: int = Field(224, ge=8, description="Crop side; validation resizes to size*256/224, then centre-crops.")
    workers: AutoCount0 = Field("auto", description="As `data.workers` (the reference used 8).")
    prefetch: AutoCount1 = Field("auto", description="As `data.prefetch`.")
    train_percent: Literal[1, 10, 100] = Field(
        100, description="Labelled share of the training split (reference: 100 for the linear probe, 1 or 10 for "
        "semi-supervised finetuning)."
    )
    subset_list: Location | None = Field(
        None, description="For train_percent 1 or 10: a file (path or URL, read once, never from the internet by "
        "default) of image file names, one per line, in SimCLR's format (`n01440764_10026.JPEG`). Unset: a "
        "deterministic class-balanced subset drawn with `subset_seed`."
    )
    subset_seed: int = Field(0, ge=0, description="Seed of the class-balanced subset when no list is given.")
    train_crop_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="RandomResizedCrop area range of the training transform (reference: 0.08-1)."
    )
    horizontal_flip: float = Field(0.5, ge=0.0, le=1.0, description="Flip probability in training (reference: 0.5).")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="Normalisation mean.")
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="Normalisation std.")


class EvalSpec(Section):
    """The protocol. Unset hyper-parameters take the reference's values for the mode."""

    mode: Literal["linear", "finetune", "knn"] = Field(
        "linear", description="`linear`: frozen backbone in eval mode, a new fc trained (reference `--weights "
        "freeze`); `finetune`: the whole network trained (`--weights finetune`); `knn`: weighted kNN on frozen "
        "features, no training."
    )
    epochs: int | None = Field(None, ge=1, description="Reference: 100 (linear), 20 (finetune).")
    batch_size: int = Field(256, ge=1, description="Global batch (reference: 256).")
    lr_classifier: float | None = Field(None, gt=0, description="Reference: 0.3 (linear), 0.5 (finetune).")
    lr_backbone: float | None = Field(None, ge=0, description="Reference: 0 (linear), 0.005 (finetune).")
    weight_decay: float | None = Field(None, ge=0, description="Reference: 1e-6 (linear), 0 (finetune).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (reference: 0.9).")
    knn_k: int = Field(200, ge=1, description="kNN mode: neighbours that vote.")
    knn_temperature: float = Field(0.1, gt=0, description="kNN mode: votes weigh exp(similarity / T).")

    @model_validator(mode="before")
    @classmethod
    def _reference_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            defaults = REFERENCE_EVAL.get(data.get("mode", "linear"), {})
            data = {**defaults, **{key: value for key, value in data.items() if value is not None}}
        return data

    @model_validator(mode="after")
    def _linear_freezes(self) -> EvalSpec:
        if self.mode == "linear" and self.lr_backbone:
            raise ValueError("mode=linear freezes the backbone: eval.lr_backbone must be 0 (use mode=finetune)")
        return self


REFERENCE_EVAL = {
    "linear": dict(epochs=100, lr_classifier=0.3, lr_backbone=0.0, weight_decay=1e-6),
    "finetune": dict(epochs=20, lr_classifier=0.5, lr_backbone=0.005, weight_decay=0.0),
    "knn": dict(epochs=1, lr_classifier=0.3, lr_backbone=0.0, weight_decay=0.0),
}


class EvaluateSpec(JobSpec):
    """An evaluation of a pretrained backbone (reference `evaluate.py`), or a kNN classification."""

    backbone: BackboneSpec = Field(default_factory=BackboneSpec)
    data: EvalDataSpec = Field(default_factory=EvalDataSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    run: RunSpec = Field(default_factory=lambda: RunSpec(output="./evaluation", log_every=50))
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
