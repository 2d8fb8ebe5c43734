"""run.compile: training with the model compiled by torch.compile, end to end."""

import pytest

from tests.support.runs import LOCAL, logged_steps, run_barlow, stats_records, train_args


def test_compiled_training_follows_eager_training(local_run, tmp_path):
    """Inductor's kernels (C++ on the CPU, Triton on GPUs) train as the eager model does, up to the rounding of fused
    kernels. The compiled run (its own: compiling is what is tested) starts from the shared local run's step-8
    checkpoint and trains steps 8-15 as that eager run did (measured: within 5e-7). From step 0 the comparison would
    measure chaos instead: in the warm-up's first steps a 1e-7 rounding difference grows ~10x a step (1e-4 by step
    5). Compiling the ResNet-18's training graph is most of the run's cost."""
    output, cache = tmp_path / "compiled", tmp_path / "inductor"
    result = run_barlow(*train_args(str(output), *LOCAL, "run.compile=true",
                                    f"checkpoint.resume={local_run.url}/checkpoints/step-000000008"),
                        threads=2, env={"TORCHINDUCTOR_CACHE_DIR": str(cache)}, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert any(cache.rglob("*")), "Inductor compiled nothing"
    compiled = {line["step"]: line["loss"] for line in logged_steps(stats_records((output / "stats.txt").read_text()))}
    eager = {line["step"]: line["loss"] for line in logged_steps(local_run.records())}
    assert compiled.keys() == set(range(8, 16))
    for step, loss in compiled.items():
        assert loss == pytest.approx(eager[step], rel=1e-3), step
