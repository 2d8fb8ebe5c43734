"""service/checkpoint/export.py: the exported backbone, in both file forms, loads into torchvision's ResNets without
their fc and into timm's strictly (the folder `barlow export` writes around it: tests/integration/test_export.py)."""

import io

import pytest
import safetensors.torch
import timm
import torch
import torchvision

from service.checkpoint.export import backbone_state_dict, weights_bytes
from service.method.model import BarlowTwins
from service.spec import ModelSpec


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_exported_backbone_loads_into_torchvision_without_fc_and_into_timm(name):
    model = BarlowTwins(ModelSpec(backbone=name, projector="32"))
    state = backbone_state_dict(model)
    assert not any(key.startswith("fc.") for key in state)
    for form in (".safetensors", ".pth"):
        data = weights_bytes(state, f"model{form}")
        loaded = (safetensors.torch.load(data) if form == ".safetensors"
                  else torch.load(io.BytesIO(data), weights_only=True))
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state), form
    reference = getattr(torchvision.models, name)()
    missing, unexpected = reference.load_state_dict(loaded, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    timm.create_model(name, pretrained=False, num_classes=0).load_state_dict(loaded)  # strict: the same key names
