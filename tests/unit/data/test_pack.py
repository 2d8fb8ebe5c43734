"""service/data/pack.py: a pack's part naming another shard than its own is not resumed from (the hostile-storage
suite: tests/integration/test_hostile_runs_and_data.py)."""

from __future__ import annotations

from service.data.pack import _is_part
from service.data.shards import shard_key


def test_a_packs_part_naming_another_shard_than_its_own_is_not_resumed_from():
    """A part is packed again unless it names the shard `shard_key` makes for its number: before, a part's key,
    whatever it was, became a shard name in the committed index."""
    part = {"plan": "p", "number": 1, "key": shard_key("train", 1), "size": 10, "samples": [], "left_out": []}
    assert _is_part(part, "train", "p", 2)
    for wrong in ({"key": "../../elsewhere/x.tar"}, {"key": shard_key("train", 0)}, {"number": 2}, {"number": "1"},
                  {"plan": "q"}):
        assert not _is_part({**part, **wrong}, "train", "p", 2), wrong
    assert not _is_part([part], "train", "p", 2)
