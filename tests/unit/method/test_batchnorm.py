"""service/method/batchnorm.py: the conversion to global BatchNorm keeps the state dict's keys and one process's
outputs."""

import torch
from torch import nn

from service.method.batchnorm import GlobalBatchNorm, convert_sync_batchnorm
from service.method.model import BarlowTwins
from service.spec import ModelSpec


def test_global_batchnorm_conversion_keeps_keys_and_single_process_behaviour():
    torch.manual_seed(0)
    model = BarlowTwins(ModelSpec(backbone="resnet18", stem="cifar", projector="64-32"))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    x = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    expected = model(*x)
    model.load_state_dict(before)
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    assert any(isinstance(m, GlobalBatchNorm) for m in converted.modules())
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
    assert converted.state_dict().keys() == before.keys()
    for got, want in zip(converted(*x), expected):
        torch.testing.assert_close(got, want)
