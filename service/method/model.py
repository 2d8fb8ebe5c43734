"""The Barlow Twins network: a torchvision ResNet backbone and the projector. No loss, no collectives."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torchvision
from torch import nn

from service.spec import ModelSpec

BACKBONE_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


def build_backbone(name: str, stem: str = "imagenet", zero_init_residual: bool = True) -> nn.Module:
    """A torchvision ResNet with `fc` replaced by identity and, as the reference pretrains it, zero-initialised
    residual branches (the last BatchNorm of each block starts at weight 0, so every block starts as the identity).

    The `cifar` stem (3x3 stride-1 first convolution, no max-pool) keeps the resolution of 32x32 images.
    """
    backbone = getattr(torchvision.models, name)(zero_init_residual=zero_init_residual)
    backbone.fc = nn.Identity()
    if stem == "cifar":
        backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        backbone.maxpool = nn.Identity()
    return backbone


def build_projector(in_features: int, sizes: list[int]) -> nn.Sequential:
    """Linear(bias=False)-BatchNorm1d-ReLU for every layer but the last, which is Linear(bias=False) alone."""
    widths = [in_features, *sizes]
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(width_in, width_out, bias=False), nn.BatchNorm1d(width_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(widths[-2], widths[-1], bias=False))
    return nn.Sequential(*layers)


class Embeddings(NamedTuple):
    z1: torch.Tensor  # the first view's projector embeddings
    z2: torch.Tensor
    features: torch.Tensor  # the first view's backbone features, detached: the sample of the rank signal (RankMe)


class BarlowTwins(nn.Module):
    """Returns the projector embeddings (z1, z2) of the two views, and the first view's backbone features (which
    the projector's backward keeps anyway: returning them costs nothing).

    The views go through the network one after the other, as in the reference, so every BatchNorm normalises
    each view with its own statistics.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.backbone = build_backbone(spec.backbone, spec.stem)
        self.projector = build_projector(BACKBONE_FEATURES[spec.backbone], spec.projector_sizes)

    def forward(self, y1: torch.Tensor, y2: torch.Tensor) -> Embeddings:
        features = self.backbone(y1)
        return Embeddings(self.projector(features), self.projector(self.backbone(y2)), features.detach())
