"""Inputs of the data pipeline's tests: a small ImageFolder of real images (scikit-learn's digits as PNGs and JPEGs),
a copy of it with damaged images, a local copy of a packed data set, and views that cost little to make."""

from __future__ import annotations

import shutil
from pathlib import Path

import PIL.Image
from sklearn.datasets import load_digits

from service.data.datasets import ImageFolder
from service.spec import AugmentSpec

IMAGES_PER_CLASS = 12  # train/ holds 120 images: 5 global batches of 24

# Random crops and flips alone: the colour augmentations cost about ten times more per image, and what the loader,
# the sampler and the shard reader must get right (which sample, which views: a function of the seed, the epoch and
# the index) does not depend on them. Their own tests: tests/unit/method/test_transforms.py,
# tests/unit/data/test_loader.py.
CROP_AND_FLIP = AugmentSpec(color_jitter=0.0, grayscale=0.0, blur=(0.0, 0.0), solarize=(0.0, 0.0))


def write_digit_folder(root: Path, per_class: int = IMAGES_PER_CLASS, size: int = 16) -> Path:
    """An ImageFolder of real images: scikit-learn's digits as `size` px PNGs (train/) and two JPEGs of each class
    (val/)."""
    digits = load_digits()
    counts: dict[int, int] = {}
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        n = counts.get(int(label), 0)
        if n >= per_class + 2:
            continue
        counts[int(label)] = n + 1
        split, suffix = ("train", "png") if n < per_class else ("val", "JPEG")
        folder = root / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image = PIL.Image.fromarray((pixels * 255 / 16).astype("uint8")).resize((size, size)).convert("RGB")
        image.save(folder / f"{i:04d}.{suffix}")
    return root


def corrupt(path: Path) -> None:
    """Cut an image after its header: PIL cannot decode it."""
    path.write_bytes(path.read_bytes()[:40])


def damaged_copy(folder: Path, destination: Path, *bad: int) -> list[Path]:
    """Copy `folder` to `destination` and corrupt the training images at the positions `bad` (ImageFolder's order);
    returns their paths in the copy."""
    shutil.copytree(folder, destination)
    samples = ImageFolder(str(destination), "train").samples
    paths = [Path(samples[index][0]) for index in bad]
    for path in paths:
        corrupt(path)
    return paths


def download(fs, url_path: str, destination: Path) -> Path:
    """Copy every object under `url_path` on `fs` into the folder `destination`, keeping the relative paths."""
    for path in fs.find(url_path):
        target = destination / path[len(url_path.rstrip("/")) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(target))
    return destination
