"""The backbone as an ONNX graph, checked in onnxruntime against PyTorch before anyone gets it.

torch's ONNX exporter (torch.export-based, which needs `onnx` and `onnxscript`) and onnxruntime are the optional
extra `onnx` (`pip install 'barlowtwins-service[onnx]'`), never a runtime dependency: this module is the only one
that imports them, and only when asked for ONNX.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from service.errors import UserError

log = logging.getLogger("barlow")

INPUT, OUTPUT = "images", "features"
ONNX_NAME = "model.onnx"
CHECK_BATCHES = (1, 3)  # two batch sizes: the batch dimension is dynamic, not the export's example
# onnxruntime and PyTorch sum in other orders: ResNet-18's features differed by 5e-6 (the demo's, a tiny run's)
TOLERANCE = 1e-4  # of the features' scale (at least 1)


class OnnxUnavailable(UserError):
    """ONNX export was asked for where its optional packages are not installed."""


class OnnxMismatch(UserError):
    """The exported graph does not compute what the PyTorch backbone computes."""


@dataclass(frozen=True)
class OnnxModel:
    data: bytes  # the serialised ModelProto
    max_difference: float  # the largest |onnxruntime - PyTorch| over the check's inputs
    scale: float  # the largest |PyTorch| over the same inputs, what the difference is relative to


def require_onnx():
    """onnxruntime, once the optional packages are known to be installed; OnnxUnavailable saying what to install."""
    try:
        import onnxruntime  # type: ignore[import-untyped]  # imported here: a missing one is said before exporting
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError as error:
        raise OnnxUnavailable(f"--format onnx needs the optional packages onnx, onnxscript and onnxruntime "
                              f"({error.name} is missing): pip install 'barlowtwins-service[onnx]'") from None
    return onnxruntime


def export_onnx(backbone: nn.Module, image_size: int) -> OnnxModel:
    """`backbone` (eval mode, features out) as ONNX with a dynamic batch dimension for 3 x image_size x image_size
    inputs, run in onnxruntime on random inputs of CHECK_BATCHES sizes against PyTorch: OnnxMismatch when the
    largest difference exceeds TOLERANCE of the features' scale."""
    onnxruntime = require_onnx()
    backbone = backbone.eval()
    example = torch.randn(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="barlow-onnx-") as folder:
        program = torch.onnx.export(backbone, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes=({0: batch},), verbose=False)
        assert program is not None  # the dynamo exporter returns its program
        program.save(f"{folder}/{ONNX_NAME}")  # one file: the weights are under ONNX's 2 GB limit
        data = Path(folder, ONNX_NAME).read_bytes()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    difference = scale = 0.0
    for size in CHECK_BATCHES:
        images = torch.randn(size, 3, image_size, image_size, generator=generator)
        with torch.no_grad():
            expected = backbone(images)
        (got,) = session.run([OUTPUT], {INPUT: images.numpy()})
        if tuple(got.shape) != tuple(expected.shape):
            raise OnnxMismatch(f"the ONNX graph returned shape {tuple(got.shape)} for {size} images, PyTorch "
                               f"{tuple(expected.shape)}")
        difference = max(difference, float((torch.from_numpy(got) - expected).abs().max()))
        scale = max(scale, float(expected.abs().max()))
    if not difference <= TOLERANCE * max(scale, 1.0):
        raise OnnxMismatch(f"the ONNX graph's features differ from PyTorch's by up to {difference:.3g} (scale "
                           f"{scale:.3g}, tolerance {TOLERANCE:g} of it): not written")
    return OnnxModel(data, difference, scale)
