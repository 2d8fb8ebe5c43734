"""service/runtime/distributed.py: shards of a count cover every item once; run.device=cuda on a machine without
CUDA is one clear error (through `barlow train`'s entry point in this process)."""

import pytest
import torch

from service.cli.main import main
from service.runtime.distributed import shard
from tests.support.runs import DIGITS, ROOT


def test_shards_cover_every_item_once():
    for count in (0, 1, 7, 10, 359):
        for world in (1, 2, 3, 4):
            items = [i for rank in range(world) for i in shard(count, rank, world)]
            assert items == list(range(count))


DIGITS_SPEC = str(ROOT / DIGITS)


def test_cuda_asked_for_on_a_machine_without_it_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", DIGITS_SPEC, "--set", "run.device=cuda"]) == 2
    assert "no usable CUDA device" in capsys.readouterr().err
