"""The colour half of the augmentations as batched tensor operations on the training device.

The CPU loader does the geometric half per image (crop, resize, flip: `transforms.geometric_pipeline`) and ships
uint8 views; this module draws every image's colour parameters for the whole global batch at once and applies them
with masked batch operations, on the GPU when training runs there. The parameters follow the reference's per-view
probabilities and torchvision's ranges (ColorJitter(0.4, 0.4, 0.2, 0.1) in a random order per image with p=0.8,
grayscale p=0.2, Gaussian blur sigma ~ U(0.1, 2), solarize at 128); the operations are torchvision's float kernels
written for a batch with one factor per image, and the blur convolves with the sampled Gaussian (which the loader
path's PIL blur approximates with box passes, as the reference's did). `tests/unit/method/test_color.py` checks
them against torchvision.

The global batch's parameters come from a generator seeded by (seed, epoch, step, view), and each worker applies
its own rows: a run draws the same augmentations at any world size, as the per-image path does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service.data.seeds import Stream, derived_seed
from service.method.transforms import BLUR_SIGMA, JITTER, SOLARIZE_THRESHOLD, blur_kernel_size
from service.spec import AugmentSpec

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@dataclass
class ColorParameters:
    """One row per image of the global batch."""

    jitter: torch.Tensor      # bool: ColorJitter applied
    order: torch.Tensor       # (B, 4): the order of brightness (0), contrast (1), saturation (2), hue (3)
    factors: torch.Tensor     # (B, 4): brightness, contrast, saturation and hue factors
    grayscale: torch.Tensor   # bool
    blur: torch.Tensor        # bool
    sigma: torch.Tensor       # blur sigma
    solarize: torch.Tensor    # bool

    def rows(self, start: int, stop: int) -> ColorParameters:
        return ColorParameters(**{name: value[start:stop] for name, value in vars(self).items()})


def sample_parameters(spec: AugmentSpec, view: int, batch: int, generator: torch.Generator) -> ColorParameters:
    uniform = lambda low, high: torch.empty(batch).uniform_(low, high, generator=generator)  # noqa: E731
    bright, contrast, saturation, hue = JITTER["brightness"], JITTER["contrast"], JITTER["saturation"], JITTER["hue"]
    return ColorParameters(
        jitter=torch.rand(batch, generator=generator) < spec.color_jitter,
        order=torch.rand(batch, 4, generator=generator).argsort(dim=1),  # a uniform permutation per image, no loop
        factors=torch.stack([uniform(1 - bright, 1 + bright), uniform(1 - contrast, 1 + contrast),
                             uniform(1 - saturation, 1 + saturation), uniform(-hue, hue)], dim=1),
        grayscale=torch.rand(batch, generator=generator) < spec.grayscale,
        blur=torch.rand(batch, generator=generator) < spec.blur[view],
        sigma=uniform(*BLUR_SIGMA),
        solarize=torch.rand(batch, generator=generator) < spec.solarize[view],
    )


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    return (r * GRAY[0] + g * GRAY[1] + b * GRAY[2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    ratio = _per_image(ratio)
    return (x * ratio + other * (1 - ratio)).clamp(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    equal = maxc == minc
    span = maxc - minc
    s = span / torch.where(equal, torch.ones_like(maxc), maxc)
    span = torch.where(equal, torch.ones_like(span), span)
    rc, gc, bc = (maxc - r) / span, (maxc - g) / span, (maxc - b) / span
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(equal, torch.zeros_like(h), h)
    return torch.stack(((h / 6.0 + 1.0) % 1.0, s, maxc), dim=1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(dim=1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    vpqt = torch.stack((v, p, q, t), dim=1)
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]]).to(x.device, non_blocking=True)
    return vpqt.gather(1, select[:, i].permute(1, 0, 2, 3))


def _blend_operations(x: torch.Tensor, operation: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Brightness (0), contrast (1) or saturation (2), one per image, as one blend: torchvision's three kernels are
    `(f x + (1 - f) other).clamp(0, 1)` with other = 0, the mean gray level or the gray image. A factor of 1 leaves
    an image as it is."""
    gray = _gray(x)
    saturation, contrast = _per_image((operation == 2).to(x.dtype)), _per_image((operation == 1).to(x.dtype))
    other = gray * saturation + gray.mean(dim=(1, 2, 3), keepdim=True) * contrast
    return _blend(x, other, factor)


def _adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(x)
    hue = (hsv[:, 0] + factor.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1))


def adjust(x: torch.Tensor, operation: int, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_brightness / contrast / saturation / hue on float images, one factor per image."""
    if operation == 3:
        return _adjust_hue(x, factor)
    return _blend_operations(x, torch.full_like(factor, operation, dtype=torch.long), factor)


def _on_rows(x: torch.Tensor, rows: torch.Tensor, operation, *per_image: torch.Tensor) -> torch.Tensor:
    """`operation` applied to the images `rows` (indices read on the host, so the device never waits for it)."""
    if len(rows) == 0:
        return x
    index = rows.to(x.device, non_blocking=True)
    values = [value[rows].to(x.device, non_blocking=True) for value in per_image]
    return x.index_copy(0, index, operation(x.index_select(0, index), *values))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """torchvision's GaussianBlur (reflect padding, separable kernel), one sigma per image."""
    half = (kernel_size - 1) / 2
    position = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (position / sigma.view(-1, 1).to(x.dtype)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, K)
    batch, channels, height, width = x.shape
    padding = kernel_size // 2
    y = F.pad(x, (padding, padding, padding, padding), mode="reflect")
    y = y.reshape(1, batch * channels, height + 2 * padding, width + 2 * padding)
    weights = kernel.repeat_interleave(channels, dim=0)
    y = F.conv2d(y, weights.view(-1, 1, 1, kernel_size), groups=batch * channels)
    y = F.conv2d(y, weights.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return y.view(batch, channels, height, width)


def apply_color(images: torch.Tensor, params: ColorParameters, kernel_size: int, mean, std) -> torch.Tensor:
    """uint8 views (B, 3, H, W) -> coloured, normalised float views, on the images' device, without host syncs.

    `params` (the images' rows, on the host) say which image each operation touches, so each image pays only for
    its own operations: per jitter position one blend over the batch, and hue and blur over their images alone.
    """
    device = images.device
    x = images.float() / 255.0
    for position in range(4):
        operation = torch.where(params.jitter, params.order[:, position], -1)
        blended = (operation >= 0) & (operation <= 2)
        if blended.any():
            factor = torch.where(blended, params.factors.gather(1, operation.clamp(0, 2).view(-1, 1)).view(-1), 1.0)
            x = _blend_operations(x, operation.to(device, non_blocking=True), factor.to(device, non_blocking=True))
        x = _on_rows(x, (operation == 3).nonzero().flatten(), _adjust_hue, params.factors[:, 3])
    x = torch.where(_per_image(params.grayscale.to(device, non_blocking=True)), _gray(x).expand_as(x), x)
    x = _on_rows(x, params.blur.nonzero().flatten(), lambda images, sigma: gaussian_blur(images, sigma, kernel_size),
                 params.sigma)
    solarize = _per_image(params.solarize.to(device, non_blocking=True))
    x = torch.where(solarize & (x >= SOLARIZE_THRESHOLD / 255), 1.0 - x, x)
    mean = torch.tensor(mean).to(device, non_blocking=True).view(1, 3, 1, 1)
    std = torch.tensor(std).to(device, non_blocking=True).view(1, 3, 1, 1)
    return (x - mean) / std


class DeviceColor:
    """Applies both views' colour augmentations to a worker's rows of the global batch (`augment.color_on`)."""

    def __init__(self, spec: AugmentSpec, image_size: int, seed: int, global_batch: int):
        self.spec = spec
        self.kernel_size = blur_kernel_size(image_size)
        self.seed = seed
        self.global_batch = global_batch

    def __call__(self, views: tuple[torch.Tensor, torch.Tensor], epoch: int, step: int,
                 rows: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for view, images in enumerate(views):
            seed = derived_seed(Stream.DEVICE_COLOR, self.seed, epoch, step, view)
            params = sample_parameters(self.spec, view, self.global_batch, torch.Generator().manual_seed(seed))
            out.append(apply_color(images, params.rows(*rows), self.kernel_size, self.spec.mean,
                                   self.spec.std))
        return out[0], out[1]
