"""service/spec/train.py: optim.batch_size must cover the workers, but need not divide among them."""

from __future__ import annotations

import pytest

from service.errors import SpecError
from service.spec import (
    load_spec,
)

DIGITS = ["data.dataset=digits"]  # satisfies the data.path rule without a data set


def test_batch_size_must_cover_the_workers_but_need_not_divide():
    # Uneven shares compute the same global-batch loss (tests/test_data.py, tests/distributed), so any world
    # size up to the batch size keeps the spec's global batch.
    assert load_spec(None, DIGITS + ["optim.batch_size=100"], world_size=3).optim.batch_size == 100
    assert load_spec(None, DIGITS, world_size=16).optim.batch_size == 2048
    with pytest.raises(SpecError) as caught:
        load_spec(None, DIGITS + ["optim.batch_size=8"], world_size=16)
    assert "optim.batch_size=8 is smaller than the 16 workers" in str(caught.value)
