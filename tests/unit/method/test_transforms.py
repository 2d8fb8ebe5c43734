"""The two asymmetric view pipelines against the reference's augmentations
(facebookresearch/barlowtwins@8e8d284 `main.py` `Transform`, lines 290-326)."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from service.method.transforms import PILGaussianBlur, blur_kernel_size, two_view_pipelines, view_pipeline
from service.spec import AugmentSpec

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
BLUR_P = {0: 1.0, 1: 0.1}
SOLARIZE_P = {0: 0.0, 1: 0.2}


def _find(pipeline: v2.Compose, kind: type) -> list:
    return [t for t in pipeline.transforms if isinstance(t, kind)]


def _random_apply_of(pipeline: v2.Compose, inner: type) -> v2.RandomApply:
    found = [
        t for t in pipeline.transforms
        if isinstance(t, v2.RandomApply) and any(isinstance(u, inner) for u in t.transforms)
    ]
    assert len(found) == 1, f"expected exactly one RandomApply([{inner.__name__}])"
    return found[0]


@pytest.fixture(scope="module", params=[0, 1], ids=["view1", "view2"])
def view(request):
    return request.param, view_pipeline(AugmentSpec(), 224, request.param)


def test_order_of_transforms(view):
    _, pipeline = view
    kinds = [type(t) for t in pipeline.transforms]
    assert kinds == [
        v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.RandomApply, v2.RandomGrayscale, v2.RandomApply,
        v2.RandomSolarize, v2.ToDtype, v2.Normalize,
    ]
    assert isinstance(pipeline.transforms[2].transforms[0], v2.ColorJitter)
    assert isinstance(pipeline.transforms[4].transforms[0], PILGaussianBlur)


def test_random_resized_crop(view):
    _, pipeline = view
    (crop,) = _find(pipeline, v2.RandomResizedCrop)
    assert tuple(crop.size) == (224, 224)
    assert tuple(crop.scale) == pytest.approx((0.08, 1.0))
    assert tuple(crop.ratio) == pytest.approx((3 / 4, 4 / 3), rel=1e-12)
    assert crop.interpolation == v2.InterpolationMode.BICUBIC


def test_horizontal_flip(view):
    _, pipeline = view
    (flip,) = _find(pipeline, v2.RandomHorizontalFlip)
    assert flip.p == 0.5


def test_color_jitter(view):
    _, pipeline = view
    apply = _random_apply_of(pipeline, v2.ColorJitter)
    assert apply.p == pytest.approx(0.8)
    assert len(apply.transforms) == 1
    jitter = apply.transforms[0]
    # torchvision's ranges for ColorJitter(0.4, 0.4, 0.2, 0.1).
    assert tuple(jitter.brightness) == pytest.approx((0.6, 1.4))
    assert tuple(jitter.contrast) == pytest.approx((0.6, 1.4))
    assert tuple(jitter.saturation) == pytest.approx((0.8, 1.2))
    assert tuple(jitter.hue) == pytest.approx((-0.1, 0.1))
    # Same as building it from the reference's arguments.
    expected = v2.ColorJitter(0.4, 0.4, 0.2, 0.1)
    for name in ("brightness", "contrast", "saturation", "hue"):
        assert tuple(getattr(jitter, name)) == pytest.approx(tuple(getattr(expected, name)))


def test_grayscale(view):
    _, pipeline = view
    (gray,) = _find(pipeline, v2.RandomGrayscale)
    assert gray.p == pytest.approx(0.2)


def test_gaussian_blur(view):
    index, pipeline = view
    apply = _random_apply_of(pipeline, PILGaussianBlur)
    assert apply.p == pytest.approx(BLUR_P[index])
    blur = apply.transforms[0]
    assert tuple(blur.sigma) == pytest.approx((0.1, 2.0))


def test_blur_is_pils_gaussian_blur_with_the_drawn_sigma():
    from PIL import ImageFilter

    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(5)
    blurred = PILGaussianBlur()(image)
    torch.manual_seed(5)
    sigma = float(torch.empty(1).uniform_(0.1, 2.0))
    expected = v2.functional.pil_to_tensor(v2.functional.to_pil_image(image).filter(ImageFilter.GaussianBlur(sigma)))
    assert torch.equal(blurred, expected) and not torch.equal(blurred, image)


def test_solarize(view):
    index, pipeline = view
    (solarize,) = _find(pipeline, v2.RandomSolarize)
    assert solarize.p == pytest.approx(SOLARIZE_P[index])
    assert solarize.threshold == 128


def test_solarize_acts_on_the_0_255_scale_before_the_float_conversion():
    # As PIL's ImageOps.solarize(img, 128): values >= 128 are inverted, values below are kept.
    pipeline = view_pipeline(AugmentSpec(solarize=(1.0, 1.0)), 224, 0)
    (solarize,) = _find(pipeline, v2.RandomSolarize)
    kinds = [type(t) for t in pipeline.transforms]
    assert kinds.index(v2.RandomSolarize) < kinds.index(v2.ToDtype)
    image = tv_tensors.Image(torch.tensor([0, 100, 127, 128, 200, 255], dtype=torch.uint8).reshape(1, 1, 6))
    out = solarize(image)
    assert out.flatten().tolist() == [0, 100, 127, 127, 55, 0]


def test_to_dtype_and_normalize(view):
    _, pipeline = view
    (to_dtype,) = _find(pipeline, v2.ToDtype)
    assert to_dtype.scale is True
    dtype = to_dtype.dtype
    if isinstance(dtype, dict):  # torchvision also accepts a per-type mapping
        dtype = dtype.get(tv_tensors.Image, dtype.get("others"))
    assert dtype == torch.float32
    (normalize,) = _find(pipeline, v2.Normalize)
    assert list(normalize.mean) == pytest.approx(IMAGENET_MEAN)
    assert list(normalize.std) == pytest.approx(IMAGENET_STD)
    assert pipeline.transforms[-1] is normalize


def test_output_of_a_view(view):
    _, pipeline = view
    torch.manual_seed(0)
    image = tv_tensors.Image(torch.randint(0, 256, (3, 300, 260), dtype=torch.uint8))
    out = pipeline(image)
    assert out.dtype == torch.float32
    assert tuple(out.shape) == (3, 224, 224)
    assert torch.isfinite(out).all()
    # Normalised with ImageNet statistics from the [0, 1] scale: the range is about [-2.2, 2.7].
    assert out.min() >= (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD) - 1e-4
    assert out.max() <= (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD) + 1e-4


def test_deterministic_part_normalises_a_constant_image():
    # Turn every random step off, keep the full-image crop: the output is the normalised image itself.
    spec = AugmentSpec(
        crop_scale=(1.0, 1.0), horizontal_flip=0.0, color_jitter=0.0, grayscale=0.0, blur=(0.0, 0.0),
        solarize=(0.0, 0.0),
    )
    pipeline = view_pipeline(spec, 16, 0)
    image = tv_tensors.Image(torch.full((3, 16, 16), 51, dtype=torch.uint8))  # 51/255 = 0.2
    out = pipeline(image)
    for channel in range(3):
        expected = (0.2 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        assert out[channel].flatten() == pytest.approx([expected] * 256, abs=1e-3)


def test_two_view_pipelines_differ_only_in_blur_and_solarize():
    first, second = two_view_pipelines(AugmentSpec(), 224)
    assert _random_apply_of(first, PILGaussianBlur).p == pytest.approx(1.0)
    assert _random_apply_of(second, PILGaussianBlur).p == pytest.approx(0.1)
    assert _find(first, v2.RandomSolarize)[0].p == pytest.approx(0.0)
    assert _find(second, v2.RandomSolarize)[0].p == pytest.approx(0.2)
    assert [type(t) for t in first.transforms] == [type(t) for t in second.transforms]


def test_spec_overrides_reach_the_pipeline():
    spec = AugmentSpec(
        blur=(0.0, 0.0), solarize=(0.3, 0.7), crop_scale=(0.4, 1.0), horizontal_flip=0.0, color_jitter=0.5,
        grayscale=0.05, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
    )
    for index, pipeline in enumerate(two_view_pipelines(spec, 32)):
        assert _random_apply_of(pipeline, PILGaussianBlur).p == 0.0
        assert _find(pipeline, v2.RandomSolarize)[0].p == pytest.approx((0.3, 0.7)[index])
        (crop,) = _find(pipeline, v2.RandomResizedCrop)
        assert tuple(crop.scale) == pytest.approx((0.4, 1.0))
        assert tuple(crop.size) == (32, 32)
        assert _find(pipeline, v2.RandomHorizontalFlip)[0].p == 0.0
        assert _random_apply_of(pipeline, v2.ColorJitter).p == pytest.approx(0.5)
        assert _find(pipeline, v2.RandomGrayscale)[0].p == pytest.approx(0.05)
        normalize = _find(pipeline, v2.Normalize)[0]
        assert list(normalize.mean) == pytest.approx([0.5] * 3)
        assert list(normalize.std) == pytest.approx([0.25] * 3)
        out = pipeline(tv_tensors.Image(torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)))
        assert tuple(out.shape) == (3, 32, 32)


def test_loaded_spec_overrides_reach_the_pipeline():
    from service.spec import load_spec

    spec = load_spec(None, ["data.dataset=digits", "augment.blur=[0, 0]"])
    first, second = two_view_pipelines(spec.augment, spec.data.image_size)
    assert _random_apply_of(first, PILGaussianBlur).p == 0.0
    assert _random_apply_of(second, PILGaussianBlur).p == 0.0


@pytest.mark.parametrize("size", [8, 16, 32, 64, 96, 224, 225, 256, 512])
def test_blur_kernel_size_is_odd_and_about_a_tenth(size):
    kernel = blur_kernel_size(size)
    assert kernel % 2 == 1
    assert kernel >= 3
    assert abs(kernel - 0.1 * size) <= 2 or kernel == 3

