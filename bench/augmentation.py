"""Two-view augmentation throughput per core, JPEG decoding included, at 224 px: ours against lightly's
BYOLTransform (the transform lightly's Barlow Twins example uses), on the same images in one run.

    .venv/bin/python bench/augmentation.py                  # 200 JPEGs of 500x375, 3 rounds
    .venv/bin/python bench/augmentation.py --images 16 --rounds 1    # CI size

One process, one thread (torch.set_num_threads(1)): images/s per core. Rows:
- ours, per image: decode once (PIL, as the reference), both views with torchvision.transforms.v2 on the uint8
  tensor (the loader path, `augment.color_on: loader`);
- ours, loader half: decode once, crop + flip per view, uint8 out; the colour half then runs batched on the GPU
  (`augment.color_on: device`): what a loader process does when training runs on CUDA;
- ours, loader half + colour batched on this CPU: the loader half, then `service.method.color.apply_color` on batches of
  32 of its views on the same core: what `augment.color_on: device` would cost a CPU-only run (why `auto` keeps
  the colour in the loader there);
- lightly BYOLTransform: decode (PIL), its two views on the PIL image, to tensors.
The ratio is to lightly's row, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peers import import_lightly  # noqa: E402
from service.data.datasets import decode_image_file  # noqa: E402
from service.method.color import apply_color, sample_parameters  # noqa: E402
from service.method.transforms import blur_kernel_size, geometric_pipeline, two_view_pipelines  # noqa: E402
from service.spec import AugmentSpec  # noqa: E402


def make_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Photograph-like JPEGs (smooth colour fields plus noise, quality 90) of ImageNet's typical 500x375."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        low = rng.uniform(0, 255, size=(6, 8, 3))
        image = PIL.Image.fromarray(low.astype(np.uint8)).resize((500, 375), PIL.Image.Resampling.BICUBIC)
        field = np.asarray(image, np.float64)
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        path = folder / f"image_{i:05d}.JPEG"
        PIL.Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def throughput(run_one, paths: list[Path], rounds: int) -> float:
    run_one(paths[0])  # warm-up
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for path in paths:
            run_one(path)
        rates.append(len(paths) / (time.perf_counter() - start))
    return statistics.median(rates)


def batched_color_rate(views: list[torch.Tensor], spec: AugmentSpec, rounds: int, batch: int = 32) -> float:
    """Images/s (both views) of the colour half alone, batched on the CPU, over the loader half's uint8 views."""
    generator = torch.Generator().manual_seed(0)
    batches = [torch.stack(views[start:start + batch]) for start in range(0, len(views), batch)]
    params = [[sample_parameters(spec, view, len(images), generator) for view in (0, 1)] for images in batches]

    def run() -> None:
        for images, per_view in zip(batches, params):
            for view_params in per_view:
                apply_color(images, view_params, blur_kernel_size(224), spec.mean, spec.std)

    run()  # warm-up
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        rates.append(len(views) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lightly = import_lightly()
    from lightly.transforms import BYOLTransform

    spec = AugmentSpec()  # the reference's two views at 224 px
    first, second = two_view_pipelines(spec, 224)
    geometric = geometric_pipeline(spec, 224)
    byol = BYOLTransform()  # lightly's defaults: 224 px, the BYOL/Barlow Twins view parameters

    def ours(path):
        image = decode_image_file(str(path))
        return first(image), second(image)

    def ours_loader_half(path):
        image = decode_image_file(str(path))
        return geometric(image), geometric(image)

    def theirs(path):
        with PIL.Image.open(path) as image:
            return byol(image.convert("RGB"))

    with tempfile.TemporaryDirectory() as folder:
        paths = make_jpegs(Path(folder), args.images)
        loader_half = throughput(ours_loader_half, paths, args.rounds)
        color_half = batched_color_rate([geometric(decode_image_file(str(path))) for path in paths], spec, args.rounds)
        rows = [("ours, per image (color_on: loader)", throughput(ours, paths, args.rounds)),
                ("ours, loader half (color_on: device)", loader_half),
                ("ours, loader half + colour batched on the CPU", 1 / (1 / loader_half + 1 / color_half)),
                (f"lightly {lightly.__version__} BYOLTransform", throughput(theirs, paths, args.rounds))]
    baseline = rows[-1][1]
    print(f"two views of 224 px per source JPEG (500x375), 1 core, {args.images} images x {args.rounds} rounds")
    print(f"{'pipeline':<46} {'images/s':>9} {'ratio':>7}")
    for name, rate in rows:
        print(f"{name:<46} {rate:>9.1f} {rate / baseline:>7.2f}")


if __name__ == "__main__":
    main()
