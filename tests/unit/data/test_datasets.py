"""service/data/datasets.py: the digits split; an image folder decoded as RGB images with labels; a corrupt image,
a missing train/ folder and missing CIFAR-10 files as clear errors. Special files: test_datasets_special_files.py."""

import PIL.Image
import pytest
import torch
from torchvision import tv_tensors

from service.data.datasets import Cifar10, Digits, ImageFolder, digits_is_test
from service.errors import DataError


def test_digits_split_is_fixed_disjoint_and_covers_every_class():
    train, test = Digits(8, train=True), Digits(8, train=False)
    assert len(train) + len(test) == 1797
    assert abs(len(test) / 1797 - 0.4) < 0.01
    assert set(train.targets) == set(test.targets) == set(range(10))
    image, label = train[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 8, 8)
    assert not digits_is_test(0) and digits_is_test(1)


def write_image_folder(root, classes=2, per_class=3):
    for c in range(classes):
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (20 + i, 24, 3), dtype=torch.uint8).numpy()
            PIL.Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_image_folder_decodes_rgb_images_with_labels(tmp_path):
    images = ImageFolder(str(write_image_folder(tmp_path)))
    image, label = images[4]
    assert len(images) == 6 and label == 1
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 21, 24)


def test_corrupt_image_is_named_in_the_error(tmp_path):
    write_image_folder(tmp_path)
    (tmp_path / "train" / "class0" / "1.png").write_bytes(b"not an image")
    images = ImageFolder(str(tmp_path))
    with pytest.raises(DataError, match=r"cannot decode image .*class0/1\.png"):
        images[1]


def test_missing_train_folder_and_missing_cifar_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="must hold a train/ folder"):
        ImageFolder(str(tmp_path))
    with pytest.raises(DataError, match="CIFAR-10 not found"):
        Cifar10(str(tmp_path))
