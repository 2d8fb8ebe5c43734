"""Every random stream of a run, derived from the spec's seed and the keys that place it (epoch, sample, step,
view): one derivation, so that streams never collide and none depends on the world size or the loader processes.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """What a derived seed drives; part of the key, so two streams with equal keys still differ."""

    SAMPLE_VIEWS = 0  # the per-image augmentations of one sample in one epoch
    BATCH_ORDER = 1  # an epoch's permutation of the data set
    DEVICE_COLOR = 2  # the colour parameters of one view of one global batch
    SUBSTITUTE = 3  # the sample that stands in for one that cannot be read (data.on_error=skip)


def derived_seed(stream: Stream, seed: int, *keys: int) -> int:
    """A 63-bit seed (torch.manual_seed and torch.Generator take it) from numpy's SeedSequence hash of the keys."""
    return int(np.random.SeedSequence([int(stream), seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> 1)
