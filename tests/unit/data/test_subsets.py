"""service/data/subsets.py: balanced subsets, and a SimCLR subset list read from any fsspec location."""

from pathlib import Path

import pytest
from PIL import Image

from service.data.datasets import ImageFolder
from service.data.subsets import balanced_indices, indices_from_list, read_subset_list
from service.errors import DataError
from service.spec import StorageSpec


def test_balanced_subset_is_deterministic_and_balanced():
    targets = [c for c in range(5) for _ in range(40 + 10 * c)]  # 40, 50, ..., 80 images per class
    ten = balanced_indices(targets, 10, seed=3)
    assert ten == balanced_indices(targets, 10, seed=3)
    assert ten != balanced_indices(targets, 10, seed=4)
    assert ten == sorted(set(ten))
    per_class = [sum(targets[i] == c for i in ten) for c in range(5)]
    assert per_class == [4, 5, 6, 7, 8]
    assert all(sum(targets[i] == c for i in balanced_indices(targets, 1, seed=0)) == 1 for c in range(5))


def image_tree(root: Path) -> Path:
    for cls in ("n01440764", "n01443537"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / "train" / cls / f"{cls}_{i}.JPEG")
    return root


def test_subset_from_a_simclr_list_on_any_fsspec_location(tmp_path):
    images = ImageFolder(str(image_tree(tmp_path)), "train")
    listing = "memory://lists/1percent.txt"
    import fsspec

    fsspec.filesystem("memory").pipe_file("/lists/1percent.txt", b"n01443537_2.JPEG\nn01440764_0.JPEG\n\n")
    names = read_subset_list(listing, StorageSpec())
    chosen = indices_from_list([path for path, _ in images.samples], names, listing)
    assert chosen == indices_from_list([path for path, _ in images.samples], names[::-1], listing)
    assert sorted(Path(images.samples[i][0]).name for i in chosen) == ["n01440764_0.JPEG", "n01443537_2.JPEG"]
    assert [images.samples[i][1] for i in chosen] == [0, 1]
    with pytest.raises(DataError, match="1 of the 2 images"):
        indices_from_list([path for path, _ in images.samples], ["n01440764_0.JPEG", "n09999999_1.JPEG"], listing)
    with pytest.raises(DataError, match="does not exist"):
        read_subset_list("memory://lists/none.txt", StorageSpec())
