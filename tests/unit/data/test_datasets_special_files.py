"""service/data/datasets.py on special files where data should be: an image folder skips those without an image's
name, and CIFAR-10's files as FIFOs are refused without being opened. What `barlow train` says of a FIFO with an
image's name: tests/e2e/test_cli_errors.py.

Apart from test_datasets.py because the image folder here is tests/support/user_errors.py's `write_image_folder`,
whose name test_datasets.py's own image folder helper has."""

import os

import pytest

from service.data.datasets import Cifar10, ImageFolder
from service.errors import DataError
from tests.support.user_errors import write_image_folder


def test_image_folder_skips_special_files_without_an_image_extension(tmp_path):
    data = write_image_folder(tmp_path / "data")
    os.mkfifo(data / "train" / "a" / "notes")  # never opened: not an image name, as torchvision's default
    images = ImageFolder(str(data))
    assert len(images) == 8 and images.classes == ["a", "b"]


def test_fifos_in_place_of_the_cifar10_files_are_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"]:
        os.mkfifo(folder / name)
    with pytest.raises(DataError, match="CIFAR-10 not found"):  # torchvision checks isfile before it opens one
        Cifar10(str(tmp_path))
