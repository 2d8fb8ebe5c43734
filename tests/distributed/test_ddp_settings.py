"""DDP's settings on real torchrun workers: a static graph changes nothing numerically; bf16 gradient compression
rounds the all-reduced gradients, so training moves slightly (and only slightly) away from the fp32 run."""

import pytest

from tests.support.runs import TINY, TINY_STEPS_PER_EPOCH, logged_steps, run_barlow, stats_records, train_args

# no checkpoints: the losses are what is compared
RECIPE = [*TINY, "checkpoint.every_steps=null", "checkpoint.every_epochs=null"]


def losses(tmp_path, name: str, *settings: str) -> dict[int, float]:
    output = tmp_path / name
    result = run_barlow(*train_args(str(output), *settings, recipe=RECIPE), torchrun=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return {line["step"]: line["loss"] for line in logged_steps(stats_records((output / "stats.txt").read_text()))}


def test_static_graph_is_exact_and_bf16_compression_only_rounds(tmp_path):
    static = losses(tmp_path, "static")
    dynamic = losses(tmp_path, "dynamic", "ddp.static_graph=false")
    compressed = losses(tmp_path, "bf16", "ddp.gradient_compression=bf16")
    assert static.keys() == dynamic.keys() == compressed.keys() == set(range(TINY_STEPS_PER_EPOCH))
    assert dynamic == static  # the same sums in the same buckets' arithmetic
    assert compressed[0] == static[0]  # no update yet
    later = [step for step in static if step > 0]
    assert any(compressed[step] != static[step] for step in later)  # the hook is in the all-reduce
    for step in later:
        assert compressed[step] == pytest.approx(static[step], rel=2e-2), step
