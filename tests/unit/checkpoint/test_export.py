"""service/checkpoint/export.py: the exported backbone loads into torchvision's ResNets, without their fc."""

import pytest
import torchvision

from service.checkpoint.export import backbone_state_dict
from service.method.model import BarlowTwins
from service.spec import ModelSpec


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_exported_backbone_loads_into_torchvision_without_fc(name):
    model = BarlowTwins(ModelSpec(backbone=name, projector="32"))
    state = backbone_state_dict(model)
    assert not any(key.startswith("fc.") for key in state)
    reference = getattr(torchvision.models, name)()
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
