"""The batched colour augmentations against torchvision: the same operations, the same parameter distributions,
the same outcome frequencies as the per-image pipeline, and the same views at any world size (a real run on one and
two workers: tests/e2e/test_torchx_local.py's resume on fewer workers)."""

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from service.method.color import DeviceColor, adjust, apply_color, gaussian_blur, sample_parameters
from service.method.transforms import JITTER, SOLARIZE_THRESHOLD, view_pipeline
from service.spec import AugmentSpec

REFERENCE = AugmentSpec()  # the reference's probabilities


def test_each_operation_equals_torchvisions_kernel_per_image():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 20, 20, generator=generator)
    factors = torch.tensor([0.6, 0.8, 1.0, 1.1, 1.3, 1.4])
    hues = torch.tensor([-0.1, -0.05, 0.0, 0.02, 0.07, 0.1])
    for operation, kernel in enumerate([F.adjust_brightness, F.adjust_contrast, F.adjust_saturation]):
        expected = torch.stack([kernel(x[i], float(factors[i])) for i in range(6)])
        torch.testing.assert_close(adjust(x, operation, factors), expected, rtol=0, atol=1e-6)
    expected = torch.stack([F.adjust_hue(x[i], float(hues[i])) for i in range(6)])
    torch.testing.assert_close(adjust(x, 3, hues), expected, rtol=0, atol=1e-5)
    sigmas = torch.tensor([0.1, 0.4, 0.8, 1.2, 1.6, 2.0])
    expected = torch.stack([F.gaussian_blur(x[i], [7, 7], [float(sigmas[i])] * 2) for i in range(6)])
    torch.testing.assert_close(gaussian_blur(x, sigmas, 7), expected, rtol=0, atol=1e-6)


def per_image_reference(image: torch.Tensor, params, i: int, kernel_size: int, spec: AugmentSpec) -> torch.Tensor:
    """One image through torchvision's functional kernels with the batch's parameters for row i, in its order."""
    x = image.float() / 255
    kernels = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    if params.jitter[i]:
        for operation in params.order[i].tolist():
            x = kernels[operation](x, float(params.factors[i, operation]))
    if params.grayscale[i]:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if params.blur[i]:
        x = F.gaussian_blur(x, [kernel_size] * 2, [float(params.sigma[i])] * 2)
    if params.solarize[i]:
        x = F.solarize(x, SOLARIZE_THRESHOLD / 255)
    return F.normalize(x, list(spec.mean), list(spec.std))


@pytest.mark.parametrize("view", [0, 1])
def test_batch_equals_each_image_through_torchvisions_kernels_with_its_parameters(view):
    n, kernel_size = 64, 5
    spec = AugmentSpec(solarize=(0.5, 0.5), blur=(1.0, 0.3))  # more solarized images than the reference's
    images = torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(view))
    params = sample_parameters(spec, view, n, torch.Generator().manual_seed(10 + view))
    batched = apply_color(images, params, kernel_size, spec.mean, spec.std)
    expected = torch.stack([per_image_reference(images[i], params, i, kernel_size, spec) for i in range(n)])
    torch.testing.assert_close(batched, expected, rtol=0, atol=5e-5)


def within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


@pytest.mark.parametrize("view", [0, 1])
def test_parameters_follow_the_reference_probabilities_and_ranges(view):
    n = 20000
    params = sample_parameters(REFERENCE, view, n, torch.Generator().manual_seed(view))
    assert within_binomial(int(params.jitter.sum()), n, REFERENCE.color_jitter)
    assert within_binomial(int(params.grayscale.sum()), n, REFERENCE.grayscale)
    assert within_binomial(int(params.blur.sum()), n, REFERENCE.blur[view])
    assert within_binomial(int(params.solarize.sum()), n, REFERENCE.solarize[view])
    for column, name in enumerate(["brightness", "contrast", "saturation"]):
        low, high = 1 - JITTER[name], 1 + JITTER[name]
        values = params.factors[:, column]
        assert low <= values.min() and values.max() <= high
        assert values.min() < low + 0.01 and values.max() > high - 0.01  # the whole range is used
    assert params.factors[:, 3].abs().max() <= JITTER["hue"]
    assert 0.1 <= params.sigma.min() and params.sigma.max() <= 2.0
    assert (params.order.sort(dim=1).values == torch.arange(4)).all()  # a permutation per image
    for operation in range(4):
        assert within_binomial(int((params.order[:, 0] == operation).sum()), n, 0.25)


def outcomes(images: torch.Tensor) -> tuple[int, int]:
    """(grayscale, solarized) counts for views of the constant colour (0.98, 0.8, 0.6): jitter never makes it gray
    nor takes its brightest channel under the solarization threshold, so a gray view was grayscaled and a view
    whose every value is under the threshold was solarized."""
    flat = images.flatten(2)
    gray = ((flat.amax(dim=1) - flat.amin(dim=1)).amax(dim=1) < 1e-3).sum()
    solarized = (flat.amax(dim=(1, 2)) < SOLARIZE_THRESHOLD / 255).sum()
    return int(gray), int(solarized)


def test_outcome_frequencies_match_the_per_image_pipeline():
    n, size = 3000, 8
    image = (torch.tensor([0.98, 0.8, 0.6]).view(3, 1, 1).expand(3, size, size) * 255).round().to(torch.uint8)
    spec = AugmentSpec(crop_scale=(1.0, 1.0), horizontal_flip=0.0)
    per_image = view_pipeline(spec, size, view=1)
    unnormalise = lambda x: x * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)  # noqa: E731
    torch.manual_seed(0)
    reference = unnormalise(torch.stack([per_image(image) for _ in range(n)]))
    params = sample_parameters(spec, 1, n, torch.Generator().manual_seed(1))
    batched = unnormalise(apply_color(image.expand(n, -1, -1, -1), params, 3, spec.mean, spec.std))
    for ours, theirs, p in zip(outcomes(batched), outcomes(reference), (spec.grayscale, spec.solarize[1])):
        assert within_binomial(ours, n, p) and within_binomial(theirs, n, p), (ours, theirs, p)
        pooled = (ours + theirs) / (2 * n)
        assert abs(ours - theirs) / n <= 5 * math.sqrt(2 * pooled * (1 - pooled) / n)


def test_views_are_the_same_at_any_world_size():
    color = DeviceColor(REFERENCE, image_size=16, seed=3, global_batch=10)
    views = tuple(torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8) for _ in range(2))
    whole = color(views, epoch=2, step=5, rows=(0, 10))
    shares = [color(tuple(v[a:b] for v in views), epoch=2, step=5, rows=(a, b)) for a, b in ((0, 3), (3, 6), (6, 10))]
    for view in range(2):
        torch.testing.assert_close(torch.cat([share[view] for share in shares]), whole[view], rtol=0, atol=0)
    other_step = color(views, epoch=2, step=6, rows=(0, 10))
    assert not torch.equal(other_step[0], whole[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a CUDA matter")
def test_colour_on_the_gpu_never_waits_for_it():
    color = DeviceColor(REFERENCE, image_size=32, seed=0, global_batch=64)
    views = tuple(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda") for _ in range(2))
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # a synchronising call raises
    try:
        out = color(views, epoch=0, step=0, rows=(0, 64))
        with pytest.raises(RuntimeError):  # the check can fail: reading a value back waits
            out[0].sum().item()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
