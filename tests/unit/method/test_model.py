"""service/method/model.py: the network: torchvision backbones with the reference's changes, and the projector."""

import torch
from torch import nn

from service.method.model import BarlowTwins, build_backbone, build_projector
from service.spec import ModelSpec


def test_projector_layers_follow_the_reference():
    projector = build_projector(2048, [8192, 8192, 8192])
    kinds = [type(layer) for layer in projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    linears = [layer for layer in projector if isinstance(layer, nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(2048, 8192), (8192, 8192), (8192, 8192)]
    assert all(layer.bias is None for layer in linears)
    # ~151M parameters in the reference's projector, 23.5M in the backbone
    assert 150e6 < sum(p.numel() for p in projector.parameters()) < 152e6


def test_backbone_is_torchvision_resnet50_with_zero_init_residual_and_no_fc():
    backbone = build_backbone("resnet50")
    assert isinstance(backbone.fc, nn.Identity)
    assert all(torch.count_nonzero(block.bn3.weight) == 0 for layer in (backbone.layer1, backbone.layer4)
               for block in layer)
    assert 23.4e6 < sum(p.numel() for p in backbone.parameters()) < 23.6e6
    assert backbone(torch.randn(2, 3, 64, 64)).shape == (2, 2048)


def test_cifar_stem_keeps_small_images_resolution():
    backbone = build_backbone("resnet18", "cifar")
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, nn.Identity)
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_model_returns_one_embedding_per_view():
    model = BarlowTwins(ModelSpec(backbone="resnet18", stem="cifar", projector="64-32"))
    y1 = torch.randn(4, 3, 16, 16)
    z1, z2, features = model(y1, torch.randn(4, 3, 16, 16))
    assert z1.shape == z2.shape == (4, 32) and not torch.equal(z1, z2)
    assert torch.equal(features, model.backbone(y1)) and not features.requires_grad  # the rank signal's sample
