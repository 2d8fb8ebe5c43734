"""Labelled subsets for semi-supervised evaluation: the published image lists, or a seeded class-balanced draw.

SimCLR's lists (used by the reference for 1% and 10% of ImageNet) name one training image per line,
`n01440764_10026.JPEG`, the class being the part before the underscore. The reference downloads them at run time;
here they are a file the user provides, on any fsspec location.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from service.errors import DataError
from service.spec import StorageSpec
from service.storage.filesystem import filesystem


def read_subset_list(url: str, storage: StorageSpec) -> list[str]:
    fs, path = filesystem(url, storage)
    try:
        text = fs.cat_file(path).decode()
    except FileNotFoundError:
        raise DataError(f"data.subset_list {url} does not exist") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"data.subset_list {url} is empty")
    return names


def indices_from_list(sample_paths: list[str], names: list[str], source: str) -> list[int]:
    """Positions of the listed file names among the data set's samples (paths), in the data set's order."""
    position = {Path(path).name: index for index, path in enumerate(sample_paths)}
    missing = [name for name in names if name not in position]
    if missing:
        raise DataError(f"{len(missing)} of the {len(names)} images listed in {source} are not in the training "
                        f"set (first: {missing[0]}); is data.path the right data set?")
    return sorted(position[name] for name in set(names))


def balanced_indices(targets: list[int], percent: float, seed: int) -> list[int]:
    """`percent` of every class (at least one image), drawn with `seed`: the same subset on every machine."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, target in enumerate(targets):
        by_class[target].append(index)
    rng = np.random.default_rng(seed)
    chosen = []
    for target in sorted(by_class):
        members = by_class[target]
        count = max(1, round(len(members) * percent / 100))
        chosen += [members[i] for i in rng.permutation(len(members))[:count]]
    return sorted(chosen)
