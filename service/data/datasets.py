"""The labelled image sets: the built-in digits, CIFAR-10's files, and ImageFolder trees, each decoded with a clear
error for a file that is not an image."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import PIL.Image
import torch
import torchvision
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from service.data.errors import SampleError
from service.data.shard_cache import ShardCache
from service.data.shard_reader import ShardedImages, split_url
from service.errors import DataError
from service.spec import DataSpec, EvalDataSpec, StorageSpec
from service.storage.filesystem import fsspec_options


def digits_is_test(index: int) -> bool:
    """The fixed 60/40 train/test split of the digits (every 5th sample's 2nd and 4th positions are test)."""
    return index % 5 in (1, 3)


class Digits(Dataset):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), upscaled to RGB `size` x `size`."""

    def __init__(self, size: int, train: bool = True):
        from sklearn.datasets import load_digits

        digits = load_digits()
        keep = [i for i in range(len(digits.target)) if digits_is_test(i) != train]
        pixels = torch.from_numpy(digits.images[keep]).float().div(16.0).unsqueeze(1)
        pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False)
        self.images = pixels.clamp(0, 1).mul(255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
        self.targets = [int(t) for t in digits.target[keep]]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, int]:
        return tv_tensors.Image(self.images[index]), self.targets[index]


class Cifar10(Dataset):
    """CIFAR-10 from torchvision's on-disk format (`cifar-10-batches-py/`), never downloaded."""

    def __init__(self, root: str, train: bool = True):
        try:
            cifar = torchvision.datasets.CIFAR10(root, train=train, download=False)
        except RuntimeError as error:
            raise DataError(
                f"CIFAR-10 not found under {root}: expected {Path(root) / 'cifar-10-batches-py'} in torchvision's "
                f"format ({error}). Download it once outside the job and point data.path at its parent folder."
            ) from None
        self.images = torch.from_numpy(cifar.data).permute(0, 3, 1, 2).contiguous()
        self.targets = list(cifar.targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, int]:
        return tv_tensors.Image(self.images[index]), self.targets[index]


def decode_image_file(path: str) -> tv_tensors.Image:
    """Decode an image file with PIL (as the reference) to a 3-channel uint8 image; a corrupt file is named."""
    try:
        with PIL.Image.open(path) as image:
            return v2.functional.to_image(image.convert("RGB"))
    except (OSError, PIL.UnidentifiedImageError) as error:
        raise DataError(f"cannot decode image {path}: {error}. Remove or replace the file.") from None


class ImageFolder(torchvision.datasets.ImageFolder):
    """An ImageNet-style folder (`root/train/<class>/<image>`)."""

    def __init__(self, root: str, split: str = "train"):
        folder = Path(root) / split
        if not folder.is_dir():
            raise DataError(f"{folder} is not a folder: data.path must hold a {split}/ folder with one folder per "
                            "class")
        super().__init__(str(folder), loader=decode_image_file, is_valid_file=regular_image_file)
        self.folder = folder

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except DataError as error:
            raise SampleError(str(error), index, os.path.relpath(self.samples[index][0], self.folder)) from None

    def sample_paths(self) -> list[str]:
        return [path for path, _ in self.samples]


def regular_image_file(path: str) -> bool:
    """torchvision's default test (an image extension), and a file with that name must be a regular file: a FIFO,
    a socket or a device would block or fail the loader in the middle of training."""
    if not torchvision.datasets.folder.has_file_allowed_extension(path, torchvision.datasets.folder.IMG_EXTENSIONS):
        return False
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as error:  # a dangling link, no permission
        raise DataError(f"{path}: cannot read this image file ({error}): remove or replace it") from None
    if not regular:
        raise DataError(f"{path}: not a regular file (a FIFO, socket or device): remove it from the data set")
    return True


LabelledImages = Digits | Cifar10 | ImageFolder | ShardedImages
"""The labelled image sets (each has `targets`, a label per image)."""


def labelled_images(spec: DataSpec | EvalDataSpec, train: bool = True,
                    storage: StorageSpec | None = None) -> LabelledImages:
    """The split the spec names; `storage` says how to reach a packed data set's URL."""
    if spec.dataset == "digits":
        return Digits(spec.image_size, train=train)
    assert spec.path is not None  # TrainSpec and EvaluateSpec require data.path for every data set but the digits
    if spec.dataset == "cifar10":
        return Cifar10(spec.path, train=train)
    split = "train" if train else "val"
    if spec.dataset == "shards":
        storage = storage or StorageSpec()
        url = split_url(spec.path, split)
        images = ShardedImages(url, storage)
        if spec.cache:
            images.cache = ShardCache(spec.cache, int(spec.cache_max_gb * 1e9), url, images.index,
                                      fsspec_options(url, storage))
        return images
    return ImageFolder(spec.path, split)


def targets_of(images: LabelledImages) -> list[int]:
    """Every label of a labelled data set, without decoding an image."""
    return list(images.targets)
