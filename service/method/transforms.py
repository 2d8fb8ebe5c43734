"""The two asymmetric augmentation pipelines of the reference, on torchvision.transforms.v2.

Both act on a uint8 image tensor (decode once, build both views from it) and end with a normalised float tensor.
Per view (reference `main.py`): RandomResizedCrop (bicubic), horizontal flip, ColorJitter(0.4, 0.4, 0.2, 0.1)
with p=0.8, grayscale p=0.2, Gaussian blur sigma ~ U(0.1, 2) with p=1.0 / 0.1, solarization at 128 with
p=0.0 / 0.2.
"""

from __future__ import annotations

import torch
from PIL import ImageFilter
from torchvision import tv_tensors
from torchvision.transforms import v2

from service.spec import AugmentSpec, EvalDataSpec

JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128  # on the 0..255 scale, as PIL's ImageOps.solarize


def blur_kernel_size(image_size: int) -> int:
    """An odd kernel of about 10% of the image (23 px at 224): wider than 3 sigma at the largest sigma."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


class PILGaussianBlur(torch.nn.Module):
    """The reference's blur: PIL's ImageFilter.GaussianBlur(radius=sigma), sigma ~ U(0.1, 2), on a uint8 image.

    PIL's blur (three box passes approximating the Gaussian, no truncation) is the reference's, and on one core it
    is several times faster than a 23-tap convolution of the tensor. The device path (service/method/color.py) convolves
    with the sampled Gaussian itself.
    """

    def __init__(self, sigma: tuple[float, float] = BLUR_SIGMA):
        super().__init__()
        self.sigma = sigma

    def forward(self, image: torch.Tensor) -> tv_tensors.Image:
        sigma = float(torch.empty(1).uniform_(*self.sigma))
        blurred = v2.functional.to_pil_image(image).filter(ImageFilter.GaussianBlur(radius=sigma))
        return tv_tensors.Image(v2.functional.pil_to_tensor(blurred))


def _geometric(spec: AugmentSpec, image_size: int) -> list[v2.Transform]:
    return [
        v2.RandomResizedCrop(
            image_size, scale=spec.crop_scale, ratio=(3 / 4, 4 / 3),
            interpolation=v2.InterpolationMode.BICUBIC, antialias=True,
        ),
        v2.RandomHorizontalFlip(p=spec.horizontal_flip),
    ]


def view_pipeline(spec: AugmentSpec, image_size: int, view: int) -> v2.Compose:
    """The pipeline of view 0 or view 1."""
    return v2.Compose([
        *_geometric(spec, image_size),
        v2.RandomApply([v2.ColorJitter(**JITTER)], p=spec.color_jitter),
        v2.RandomGrayscale(p=spec.grayscale),
        v2.RandomApply([PILGaussianBlur(BLUR_SIGMA)], p=spec.blur[view]),
        v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=spec.solarize[view]),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(spec.mean), std=list(spec.std)),
    ])


def geometric_pipeline(spec: AugmentSpec, image_size: int) -> v2.Compose:
    """The per-image half when the colour half runs on the device (method/color.py): crop and flip, uint8 out."""
    return v2.Compose(_geometric(spec, image_size))


def two_view_pipelines(spec: AugmentSpec, image_size: int) -> tuple[v2.Compose, v2.Compose]:
    return view_pipeline(spec, image_size, 0), view_pipeline(spec, image_size, 1)


def classification_pipelines(spec: EvalDataSpec) -> tuple[v2.Compose, v2.Compose]:
    """The reference evaluate.py's transforms: training RandomResizedCrop + flip; validation Resize(size*256/224)
    then CenterCrop(size); both normalised."""
    finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(spec.mean), std=list(spec.std))]
    train = v2.Compose([
        v2.RandomResizedCrop(spec.image_size, scale=spec.train_crop_scale, antialias=True),
        v2.RandomHorizontalFlip(p=spec.horizontal_flip),
        *finish,
    ])
    validation = v2.Compose([
        v2.Resize(round(spec.image_size * 256 / 224), antialias=True),
        v2.CenterCrop(spec.image_size),
        *finish,
    ])
    return train, validation


def feature_pipeline(image_size: int, mean, std) -> v2.Compose:
    """Frozen-feature probes: the image at the training resolution, centred and normalised, nothing random."""
    return v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))])
