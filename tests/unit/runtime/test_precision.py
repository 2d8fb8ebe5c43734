"""service/runtime/precision.py: the autocast dtype and the loss scaling chosen per device."""

import torch

from service.runtime.precision import Precision


def test_precision_choice_per_device():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert Precision.choose("fp16", cuda).dtype == torch.float16  # the reference: fp16 autocast + GradScaler
    assert Precision.choose("bf16", cuda).dtype == torch.bfloat16
    assert Precision.choose("bf16", cpu).dtype == torch.bfloat16
    assert Precision.choose("fp16", cpu).dtype is None  # no fp16 autocast on the CPU: fp32
    assert Precision.choose("fp32", cuda).dtype is None
    assert not Precision.choose("bf16", cpu).grad_scaler().is_enabled()
