"""service/spec/job.py: what both kinds of spec check across sections: data.path is required but for the digits,
and checkpoint.allow_changes must name fields of the spec."""

from __future__ import annotations

import pytest

from service.errors import SpecError
from service.spec import (
    load_spec,
)
from tests.support.runs import DIGITS, ROOT


def test_data_path_required_for_imagefolder():
    with pytest.raises(SpecError) as caught:
        load_spec(None)
    assert "data.path" in str(caught.value)
    with pytest.raises(SpecError, match="data.path"):
        load_spec(None, ["data.dataset=cifar10"])
    assert load_spec(None, ["data.path=/somewhere"]).data.path == "/somewhere"


def test_allow_changes_must_name_fields_of_the_spec():
    digits = ROOT / DIGITS
    assert load_spec(digits, ["checkpoint.allow_changes=[optim.epochs, augment]"])
    with pytest.raises(SpecError, match="names 'optim.epoch' \\(did you mean 'optim.epochs'\\?\\): not a field"):
        load_spec(digits, ["checkpoint.allow_changes=[optim.epoch]"])
