"""service/data/shards.py: a packed index round-trips; a byte range that wraps around and a shard name that is a path
are refused (the hostile-storage suite: tests/integration/test_hostile_runs_and_data.py)."""

from __future__ import annotations

import numpy as np
import pytest

from service.data.shards import ShardIndex
from service.storage.untrusted import UntrustedObject


def index(**changes) -> ShardIndex:
    samples = [dict(shard=0, offset=512, size=10, label=1, crc32=5, name="b/x.png"),
               dict(shard=1, offset=512, size=10, label=0, crc32=6, name="a/y.png")]
    built = ShardIndex.build(["a", "b"], ["3f/train-000000.tar", "07/train-000001.tar"], [1024, 1024], samples,
                             meta=dict(source="s", plan="p", left_out=[]))
    for name, value in changes.items():
        setattr(built, name, value)
    return built


def test_an_index_round_trips_and_a_byte_range_that_wraps_around_is_refused():
    read = ShardIndex.from_bytes(index().to_bytes(), "i")
    assert read.all_names() == ["b/x.png", "a/y.png"] and read.shards[1] == "07/train-000001.tar"
    assert len(ShardIndex.from_bytes(ShardIndex.build(["a"], [], [], [], dict(left_out=[])).to_bytes(), "i")) == 0
    wrapping = index(offset=np.array([512, 2**64 - 4], dtype=np.uint64))  # offset + size wraps to 6
    with pytest.raises(UntrustedObject, match="i: a sample's bytes beyond the end of its shard"):
        ShardIndex.from_bytes(wrapping.to_bytes(), "i")
    with pytest.raises(UntrustedObject, match="'3f/ab/train-000000.tar' is not a name this project writes"):
        ShardIndex.from_bytes(index(shards=["3f/ab/train-000000.tar", "x.tar"]).to_bytes(), "i")
