"""Two torchrun workers (gloo, CPU) compute exactly what one process computes on the whole batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("parity_worker.py")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, rel: float = 1e-5,
                 tiny: float = 1e-8) -> None:
    """Equal up to float32 summation order: the largest difference is small against the tensor's scale.

    `tiny` absorbs rounding in tensors that are themselves almost zero (biases still near their zero init).
    """
    scale = expected.abs().max()
    difference = (actual - expected).abs().max()
    assert difference <= rel * scale + tiny, f"{name}: largest difference {difference} at scale {scale}"


def run_workers(nproc: int, out: Path, *extra: str) -> dict:
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         str(WORKER), str(out), *extra],
        check=True, timeout=300,
    )
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run_workers(1, tmp_path_factory.mktemp("one") / "out.pt", "none", "reduce", "known")


@pytest.fixture(scope="module", params=["reduce", "gather"])
def pair(request, tmp_path_factory):
    """2 workers with each communication plan: all-reducing the D x D matrix, or gathering the embeddings.

    The loss measures the row counts here; the three-worker runs pass the global batch instead.
    """
    return run_workers(2, tmp_path_factory.mktemp("two") / "out.pt", "none", request.param, "measured")


def test_loss_is_the_global_batch_loss(single, pair):
    torch.testing.assert_close(pair["loss"], single["loss"], rtol=1e-5, atol=1e-5)


def test_gradients_equal_full_batch_gradients(single, pair):
    # Not 1/world_size of them, as the reference's non-differentiable all_reduce gave.
    assert single["grads"].keys() == pair["grads"].keys()
    for name, grad in single["grads"].items():
        assert_close(pair["grads"][name], grad, name)


def test_parameters_and_batchnorm_statistics_after_steps_are_equal(single, pair):
    for name, value in single["params"].items():
        assert_close(pair["params"][name], value, name)
    for name, value in single["buffers"].items():
        assert_close(pair["buffers"][name].float(), value.float(), name)


@pytest.mark.parametrize("communication", ["reduce", "gather"])
def test_uneven_shares_over_three_workers_give_the_same_gradients(single, tmp_path, communication):
    # 16 samples over 3 workers: shares of 5, 5 and 6, known to the loss from the global batch (as in training)
    triple = run_workers(3, tmp_path / "out.pt", "none", communication, "known")
    torch.testing.assert_close(triple["loss"], single["loss"], rtol=1e-5, atol=1e-5)
    for name, grad in single["grads"].items():
        assert_close(triple["grads"][name], grad, name)
    for name, value in single["params"].items():
        assert_close(triple["params"][name], value, name)


def test_reference_world_size_divides_the_gradient(single, tmp_path):
    reference = run_workers(2, tmp_path / "out.pt", "16")
    torch.testing.assert_close(reference["loss"], single["loss"], rtol=1e-5, atol=1e-5)
    for name, grad in single["grads"].items():
        assert_close(reference["grads"][name], grad / 16, name)
