"""How much pretraining bought: the pretrained backbone against the same architecture untrained and against raw
pixels, on the held-out split, with three frozen-feature probes (weighted kNN, a linear probe, and few-shot nearest
neighbour). The built-in demo ends with this table.

Two untrained networks, both frozen in eval mode as the pretrained one: torchvision's default initialisation (the
strongest untrained ResNet: every residual branch contributes from the start) and the pretraining's own
initialisation (zero-initialised residual branches, so each block starts as the identity: almost blind).
"""

from __future__ import annotations

import torch

from service.checkpoint.export import load_pretrained
from service.data.datasets import labelled_images
from service.data.loader import Transformed
from service.evaluation.probes import few_shot_accuracy, gathered_features, knn_accuracy, linear_accuracy
from service.method.model import build_backbone
from service.method.transforms import feature_pipeline
from service.spec import TrainSpec

PROBES = ("kNN (k=200)", "linear", "5-shot 1-NN")
PRETRAINED, DEFAULT_INIT, PRETRAINING_INIT, PIXELS = "pretrained", "default init", "zero-init residual", "raw pixels"
UNTRAINED = (DEFAULT_INIT, PRETRAINING_INIT)


def probe_all(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
              seed: int) -> dict[str, float]:
    return {PROBES[0]: knn_accuracy(train, test), PROBES[1]: linear_accuracy(train, test),
            PROBES[2]: few_shot_accuracy(train, test, shots=5, draws=20, seed=seed)}


def compare(spec: TrainSpec, weights: str) -> dict[str, dict[str, float]]:
    """{feature source: {probe: accuracy}} for the pretrained backbone, the two untrained ones and raw pixels."""
    transform = feature_pipeline(spec.data.image_size, spec.augment.mean, spec.augment.std)
    train = Transformed(labelled_images(spec.data, train=True, storage=spec.storage), transform)
    test = Transformed(labelled_images(spec.data, train=False, storage=spec.storage), transform)

    def backbone(state: dict | None = None, zero_init_residual: bool = True) -> torch.nn.Module:
        torch.manual_seed(spec.run.seed)
        network = build_backbone(spec.model.backbone, spec.model.stem, zero_init_residual)
        if state is not None:
            network.load_state_dict(state)
        return network

    def pixels(images) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = zip(*(images[i] for i in range(len(images))))
        return torch.stack(x).flatten(1), torch.tensor(y)

    results = {}
    for name, network in ((PRETRAINED, backbone(load_pretrained(weights, spec.storage))),
                          (DEFAULT_INIT, backbone(zero_init_residual=False)),
                          (PRETRAINING_INIT, backbone(zero_init_residual=True))):
        results[name] = probe_all(gathered_features(network, train), gathered_features(network, test), spec.run.seed)
    results[PIXELS] = probe_all(pixels(train), pixels(test), spec.run.seed)
    return results


def strongest_untrained(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """The best untrained network on each probe: the bar pretraining has to clear."""
    return {probe: max(results[name][probe] for name in UNTRAINED) for probe in PROBES}


def format_table(results: dict[str, dict[str, float]]) -> str:
    lines = [f"{'held-out accuracy':<20}" + "".join(f"{probe:>14}" for probe in PROBES)]
    for name, scores in results.items():
        lines.append(f"{name:<20}" + "".join(f"{scores[probe]:>14.3f}" for probe in PROBES))
    return "\n".join(lines)
