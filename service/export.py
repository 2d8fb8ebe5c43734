"""The exported backbone: a torchvision ResNet state_dict without `fc.*`, as the reference's resnet50.pth."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from service.spec import TrainSpec, spec_to_yaml


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights with torchvision key names, on the CPU, whatever wraps the model (DDP, compile)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return {key: value.detach().cpu().clone() for key, value in model.backbone.state_dict().items()}


def export_backbone(model: nn.Module, spec: TrainSpec, output: Path) -> Path:
    """Write `<backbone>.pth` and the resolved spec beside it; returns the weights' path."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"{spec.model.backbone}.pth"
    torch.save(backbone_state_dict(model), path)
    (output / "spec.yaml").write_text(spec_to_yaml(spec))
    return path
