"""The Barlow Twins loss against an independent float64 re-derivation of the paper's formula (Zbontar et al. 2021,
eq. 1 and 2; facebookresearch/barlowtwins@8e8d284 `main.py` `BarlowTwins.forward` lines 207-221).

loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2, with C = bn(z1).T @ bn(z2) / N, where bn normalises
each dimension with the batch mean and the biased batch variance, eps 1e-5 (BatchNorm1d(affine=False)).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.method.loss import barlow_twins_loss, cross_correlation, off_diagonal

EPS = 1e-5


def reference_cross_correlation(z1: np.ndarray, z2: np.ndarray) -> np.ndarray:
    """C written out with explicit loops in float64, as BatchNorm1d(affine=False) in training mode would."""
    z1 = np.asarray(z1, dtype=np.float64)
    z2 = np.asarray(z2, dtype=np.float64)
    n, d = z1.shape

    def normalise(z: np.ndarray) -> np.ndarray:
        out = np.empty_like(z)
        for k in range(d):
            column = z[:, k]
            mean = sum(column) / n
            variance = sum((x - mean) ** 2 for x in column) / n  # biased
            out[:, k] = (column - mean) / np.sqrt(variance + EPS)
        return out

    a, b = normalise(z1), normalise(z2)
    c = np.zeros((d, d))
    for i in range(d):
        for j in range(d):
            c[i, j] = sum(a[s, i] * b[s, j] for s in range(n)) / n
    return c


def reference_loss(z1: np.ndarray, z2: np.ndarray, lambd: float) -> float:
    c = reference_cross_correlation(z1, z2)
    d = c.shape[0]
    on_diagonal = 0.0
    off_diagonal_sum = 0.0
    for i in range(d):
        for j in range(d):
            if i == j:
                on_diagonal += (c[i, j] - 1.0) ** 2
            else:
                off_diagonal_sum += c[i, j] ** 2
    return on_diagonal + lambd * off_diagonal_sum


@pytest.mark.parametrize("n,d,lambd", [(16, 5, 0.0051), (9, 7, 0.5), (32, 3, 0.0), (8, 12, 0.0051)])
def test_loss_matches_float64_rederivation(n, d, lambd):
    rng = np.random.default_rng(n * 100 + d)
    # Different scales and offsets per dimension, and correlated views, so every term matters.
    z1 = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=d) + rng.normal(size=d)
    z2 = 0.7 * z1 + 0.5 * rng.normal(size=(n, d))
    expected = reference_loss(z1, z2, lambd)

    got64 = barlow_twins_loss(torch.from_numpy(z1), torch.from_numpy(z2), lambd=lambd)
    assert got64.ndim == 0
    assert got64.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)

    got32 = barlow_twins_loss(torch.from_numpy(z1).float(), torch.from_numpy(z2).float(), lambd=lambd)
    assert got32.item() == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_cross_correlation_matches_float64_rederivation():
    rng = np.random.default_rng(3)
    z1 = rng.normal(size=(20, 6)) * 4.0 + 2.0
    z2 = rng.normal(size=(20, 6)) - 1.0
    expected = reference_cross_correlation(z1, z2)
    got = cross_correlation(torch.from_numpy(z1), torch.from_numpy(z2))
    assert got.shape == (6, 6)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_default_lambda_is_the_reference_value():
    rng = np.random.default_rng(11)
    z1 = rng.normal(size=(12, 6))
    z2 = rng.normal(size=(12, 6))
    expected = reference_loss(z1, z2, 0.0051)
    got = barlow_twins_loss(torch.from_numpy(z1), torch.from_numpy(z2))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # And the off-diagonal weight really is 0.0051, not e.g. 5e-3 (the paper's value).
    assert got.item() != pytest.approx(reference_loss(z1, z2, 5e-3), rel=1e-6)


def test_loss_is_invariant_to_per_dimension_affine_maps():
    rng = np.random.default_rng(5)
    n, d = 24, 6
    x = rng.normal(size=(n, d))
    y = 0.6 * x + 0.8 * rng.normal(size=(n, d))
    # Per-dimension positive scales and offsets; kept moderate so eps=1e-5 in the variance stays negligible.
    a = rng.uniform(0.5, 4.0, size=d)
    c = rng.uniform(0.5, 4.0, size=d)
    b = rng.normal(scale=10.0, size=d)
    e = rng.normal(scale=10.0, size=d)
    base = barlow_twins_loss(torch.from_numpy(x), torch.from_numpy(y))
    mapped = barlow_twins_loss(torch.from_numpy(a * x + b), torch.from_numpy(c * y + e))
    assert mapped.item() == pytest.approx(base.item(), rel=1e-6)
    # A per-sample (not per-dimension) change of the embeddings does change the loss: the test can fail.
    shuffled = barlow_twins_loss(torch.from_numpy(x), torch.from_numpy(y[rng.permutation(n)]))
    assert shuffled.item() != pytest.approx(base.item(), rel=1e-3)


def _off_diagonal_reference(m: np.ndarray) -> np.ndarray:
    mask = ~np.eye(m.shape[0], dtype=bool)
    return m[mask]  # row-major order, as flatten() of the reference helper


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 16])
def test_off_diagonal_matches_boolean_mask(size):
    m = torch.arange(size * size, dtype=torch.float64).reshape(size, size) * 1.5 - 3.0
    got = off_diagonal(m)
    expected = _off_diagonal_reference(m.numpy())
    assert got.shape == (size * (size - 1),)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_off_diagonal_random_values():
    m = torch.randn(9, 9, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(off_diagonal(m).numpy(), _off_diagonal_reference(m.numpy()))


@pytest.mark.parametrize("shape", [(3, 4), (5, 2), (1, 2)])
def test_off_diagonal_rejects_non_square(shape):
    with pytest.raises(ValueError, match="square"):
        off_diagonal(torch.zeros(shape))


def test_identical_decorrelated_embeddings_give_zero_loss():
    # Columns that are centred, orthogonal and of equal norm: the normalised embeddings have identity
    # cross-correlation (up to eps), so the loss is ~0.
    n, d = 64, 8
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(n, d + 1)))
    # Make the columns orthogonal to the all-ones vector (zero mean) by projecting it out, then re-orthonormalise.
    ones = np.ones((n, 1)) / np.sqrt(n)
    basis = np.linalg.qr(np.hstack([ones, q]))[0][:, 1 : d + 1]
    z = torch.from_numpy(basis * np.sqrt(n) * 3.0 + 7.0)
    c = cross_correlation(z, z)
    np.testing.assert_allclose(c.numpy(), np.eye(d), atol=1e-5)
    loss = barlow_twins_loss(z, z)
    assert loss.item() == pytest.approx(0.0, abs=1e-8)
    # Whereas identical but redundant (duplicated) dimensions are penalised.
    redundant = torch.cat([z[:, :4], z[:, :4]], dim=1)
    assert barlow_twins_loss(redundant, redundant).item() > 1e-3


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    z1 = torch.randn(6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    z2 = torch.randn(6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    # gradcheck's finite differences need the loss to be evaluated in float64; a loss that silently
    # downcasts float64 embeddings to float32 makes them meaningless (and loses precision for callers).
    out = barlow_twins_loss(z1, z2, lambd=0.3)
    assert out.dtype == torch.float64, f"float64 embeddings gave a {out.dtype} loss: the loss downcasts to float32"
    assert torch.autograd.gradcheck(lambda a, b: barlow_twins_loss(a, b, lambd=0.3), (z1, z2), eps=1e-6, atol=1e-5)


def test_gradient_matches_finite_differences_of_the_reference():
    # The analytic gradient against central differences of the independent numpy loss.
    rng = np.random.default_rng(2)
    z1 = rng.normal(size=(5, 3))
    z2 = rng.normal(size=(5, 3))
    t1 = torch.from_numpy(z1).requires_grad_(True)
    barlow_twins_loss(t1, torch.from_numpy(z2), lambd=0.2).backward()
    h = 1e-6
    numeric = np.zeros_like(z1)
    for idx in np.ndindex(*z1.shape):
        plus, minus = z1.copy(), z1.copy()
        plus[idx] += h
        minus[idx] -= h
        numeric[idx] = (reference_loss(plus, z2, 0.2) - reference_loss(minus, z2, 0.2)) / (2 * h)
    np.testing.assert_allclose(t1.grad.numpy(), numeric, rtol=1e-4, atol=1e-6)


def test_loss_under_cpu_bf16_autocast_is_computed_in_fp32():
    gen = torch.Generator().manual_seed(4)
    z1 = torch.randn(32, 64, generator=gen)
    z2 = 0.5 * z1 + torch.randn(32, 64, generator=gen)
    reference = barlow_twins_loss(z1, z2)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        # A matmul under autocast would produce bf16 embeddings; pass the fp32 ones to isolate the loss itself.
        loss = barlow_twins_loss(z1, z2)
        c = cross_correlation(z1, z2)
    assert loss.dtype == torch.float32
    assert c.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    # The tolerance above discriminates: merely rounding the inputs to bf16 already moves the loss beyond it.
    low = (z1.bfloat16().float(), z2.bfloat16().float())
    assert barlow_twins_loss(*low).item() != pytest.approx(reference.item(), rel=1e-5)


def test_bf16_embeddings_under_autocast_give_fp32_loss():
    gen = torch.Generator().manual_seed(6)
    z1 = torch.randn(32, 16, generator=gen)
    z2 = torch.randn(32, 16, generator=gen)
    z1b, z2b = z1.bfloat16(), z2.bfloat16()
    expected = barlow_twins_loss(z1b.float(), z2b.float())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = barlow_twins_loss(z1b, z2b)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError):
        barlow_twins_loss(torch.zeros(4, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError):
        barlow_twins_loss(torch.zeros(4, 3, 2), torch.zeros(4, 3, 2))


def test_communication_plan_chosen_by_bytes_where_bytes_are_dear():
    from service.method.loss import choose_communication

    assert choose_communication(2048, 8192, multi_node=True) == "gather"   # 2 N D < 4 D^2: 8x fewer bytes
    assert choose_communication(20000, 8192, multi_node=True) == "reduce"  # N >= 2 D: the matrix is smaller
    assert choose_communication(2048, 8192, multi_node=False) == "reduce"  # NVLink: bytes are cheap, matmuls not


def test_global_batch_that_is_not_the_rows_is_rejected():
    z = torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"holds 8 rows, but its share of the global batch 16 is 16 rows"):
        barlow_twins_loss(z, z, global_batch=16)
    with pytest.raises(ValueError, match="share of the global batch"):
        cross_correlation(z, z, "gather", global_batch=4)


def test_known_global_batch_gives_the_measured_loss():
    gen = torch.Generator().manual_seed(8)
    z1, z2 = torch.randn(2, 10, 6, dtype=torch.float64, generator=gen)
    for communication in ("reduce", "gather", "auto"):
        known = barlow_twins_loss(z1, z2, communication=communication, global_batch=10)
        assert known.item() == pytest.approx(barlow_twins_loss(z1, z2, communication=communication).item(), rel=1e-12)


def _own_and_others(n_own: int, n_others: int, d: int, dtype=torch.float64, offset: float = 0.0):
    gen = torch.Generator().manual_seed(n_own * 31 + n_others)
    # Offsets and scales per dimension, and correlated views, as the embeddings of a real batch.
    z1 = torch.randn(n_own + n_others, d, dtype=torch.float64, generator=gen) * 3.0 + offset
    z2 = 0.6 * z1 + torch.randn(n_own + n_others, d, dtype=torch.float64, generator=gen) - offset
    return z1.to(dtype), z2.to(dtype)


@pytest.mark.parametrize("n_own,n_others", [(5, 11), (1, 7), (6, 0), (0, 9)])
def test_cross_correlation_of_own_rows_has_the_whole_batch_value_and_gradient(n_own, n_others):
    from service.method.loss import cross_correlation_of_own_rows

    z1, z2 = _own_and_others(n_own, n_others, 7)
    own1 = z1[:n_own].clone().requires_grad_(True)
    own2 = z2[:n_own].clone().requires_grad_(True)
    c = cross_correlation_of_own_rows(own1, own2, z1[n_own:], z2[n_own:])
    whole1, whole2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    expected = cross_correlation(whole1, whole2)
    torch.testing.assert_close(c, expected, rtol=1e-12, atol=1e-12)
    # The loss's gradient with respect to the own rows is the whole batch's, restricted to them.
    weights = torch.randn(7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (c * weights).sum().backward()
    (expected * weights).sum().backward()
    if n_own:
        torch.testing.assert_close(own1.grad, whole1.grad[:n_own], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(own2.grad, whole2.grad[:n_own], rtol=1e-10, atol=1e-12)


def test_cross_correlation_of_own_rows_in_fp32_does_not_cancel():
    # Embeddings far from zero: centring the others by the batch mean before their product keeps fp32 accurate.
    from service.method.loss import cross_correlation_of_own_rows

    z1, z2 = _own_and_others(6, 26, 8, offset=1000.0)
    expected = cross_correlation(z1, z2)  # float64
    got = cross_correlation_of_own_rows(z1[:6].float(), z2[:6].float(), z1[6:].float(), z2[6:].float())
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)


def test_gather_backward_multiplies_own_rows_only():
    # The backward's matrix products cost the own rows' share (N_own D^2 multiply-adds, twice), not the batch's;
    # the forward still multiplies the whole batch. (The own product carries two more rows: the mean's terms.)
    from torch.utils.flop_counter import FlopCounterMode

    from service.method.loss import cross_correlation_of_own_rows

    n_own, n_others, d = 4, 60, 32
    z1, z2 = _own_and_others(n_own, n_others, d, dtype=torch.float32)
    own1, own2 = z1[:n_own].clone().requires_grad_(True), z2[:n_own].clone().requires_grad_(True)
    with FlopCounterMode(display=False) as forward:
        loss = cross_correlation_of_own_rows(own1, own2, z1[n_own:], z2[n_own:]).square().sum()
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    assert forward.get_total_flops() == 2 * (n_own + 2 + n_others) * d * d
    assert backward.get_total_flops() == 2 * 2 * (n_own + 2) * d * d
    # Whereas autograd through the whole batch's product (the plan before) costs the whole batch backward.
    whole1, whole2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    loss = cross_correlation(whole1, whole2).square().sum()
    with FlopCounterMode(display=False) as whole:
        loss.backward()
    assert whole.get_total_flops() == 2 * 2 * (n_own + n_others) * d * d


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a CUDA matter")
def test_loss_with_known_global_batch_never_waits_for_the_device():
    from service.method.loss import cross_correlation_of_own_rows

    gen = torch.Generator(device="cuda").manual_seed(0)
    z1 = torch.randn(64, 32, device="cuda", generator=gen, requires_grad=True)
    z2 = torch.randn(64, 32, device="cuda", generator=gen, requires_grad=True)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # a synchronising call raises
    try:
        for communication in ("reduce", "gather", "auto"):
            barlow_twins_loss(z1, z2, communication=communication, global_batch=64).backward()
        cross_correlation_of_own_rows(z1[:8], z2[:8], z1[8:].detach(), z2[8:].detach()).square().sum().backward()
        with pytest.raises(RuntimeError):  # the check can fail: measuring the batch for `auto` waits
            barlow_twins_loss(z1, z2, communication="auto")
    finally:
        torch.cuda.set_sync_debug_mode(previous)
