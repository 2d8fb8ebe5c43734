"""service/spec/evaluate.py: the evaluation spec's defaults are the reference's per mode (the argparse defaults of
facebookresearch/barlowtwins@8e8d284 `evaluate.py` lines 25-50), and its helpful errors."""

import pytest

from service.errors import SpecError
from service.spec import EvaluateSpec, load_spec


def test_evaluation_spec_defaults_are_the_reference_per_mode():
    linear = load_spec(None, ["data.dataset=digits"], kind=EvaluateSpec).eval
    assert (linear.epochs, linear.batch_size, linear.lr_classifier, linear.lr_backbone, linear.weight_decay,
            linear.momentum) == (100, 256, 0.3, 0.0, 1e-6, 0.9)
    finetune = load_spec(None, ["data.dataset=digits", "eval.mode=finetune"], kind=EvaluateSpec).eval
    assert (finetune.epochs, finetune.lr_classifier, finetune.lr_backbone, finetune.weight_decay) == (20, 0.5, 0.005, 0)
    with pytest.raises(SpecError, match="freezes the backbone"):
        load_spec(None, ["data.dataset=digits", "eval.lr_backbone=0.1"], kind=EvaluateSpec)
    with pytest.raises(SpecError, match="did you mean 'train_percent'"):
        load_spec(None, ["data.dataset=digits", "data.train_procent=10"], kind=EvaluateSpec)
