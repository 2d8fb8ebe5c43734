"""One optimisation step, and what it leaves on the device for the loop to read only at logged steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.method.loss import barlow_twins_terms
from service.observe.step_metrics import (
    RANKME_STEP_ROWS,
    StepClock,
    correlation_magnitudes,
    decimated,
    embedding_std,
    feature_gram,
    peak_memory_gib,
    rankme_of_gram,
)
from service.runtime import distributed
from service.runtime.guard import NonFiniteGuard
from service.runtime.precision import Precision
from service.spec import LossSpec


@dataclass
class StepOutput:
    """What one step leaves on the device (0-d tensors, detached): the loss, its two terms scaled as the loss is
    (they add up to it), and, for an observed step, the collapse signal, the cross-correlation's mean diagonal and
    off-diagonal magnitudes, and the decimated cross-correlation."""

    loss: torch.Tensor
    on_diag: torch.Tensor
    off_diag: torch.Tensor
    embedding_std: torch.Tensor | None = None
    correlation_diagonal: torch.Tensor | None = None
    correlation_off_diagonal: torch.Tensor | None = None
    correlation: torch.Tensor | None = None
    feature_gram: torch.Tensor | None = None  # with the monitor off: the rank signal's sample (step_metrics)...
    feature_sample: int = 0  # ...of this many rows


def training_step(model, optimizer, scaler, precision: Precision, loss_spec: LossSpec,
                  y1: torch.Tensor, y2: torch.Tensor, global_batch: int | None = None,
                  guard: NonFiniteGuard | None = None, observe: bool = False, rank: bool = False) -> StepOutput:
    """One optimisation step on this worker's share of the global batch; returns the (global) loss and its terms.

    `global_batch`, when known, spares the loss exchanging row counts and waiting for the device. With a `guard`,
    a step whose loss or gradients are not finite is not applied (decided on the device). `observe` adds the
    collapse signal of this worker's embeddings and the decimated cross-correlation (device work, no sync); `rank`
    the Gram matrix of the first view's backbone features, for RankMe where the kNN monitor does not give it.
    """
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        z1, z2, features = model(y1, y2)
    terms = barlow_twins_terms(z1, z2, loss_spec.communication, global_batch=global_batch)
    on_diag = terms.on_diag * loss_spec.scale_loss
    off_diag = terms.off_diag * (loss_spec.lambd * loss_spec.scale_loss)
    loss = on_diag + off_diag
    # The logged loss is the reference's; only the gradient is divided, as the reference's was, when asked.
    scaler.scale(loss / (loss_spec.reference_world_size or 1)).backward()
    if guard is None:
        scaler.step(optimizer)
    else:
        scaler.step(optimizer, apply=guard.finite(loss.detach(), optimizer, scaled=scaler.is_enabled()))
    scaler.update()
    output = StepOutput(loss.detach(), on_diag.detach(), off_diag.detach())
    if observe:
        output.embedding_std = embedding_std(z1)
        output.correlation_diagonal, output.correlation_off_diagonal = correlation_magnitudes(terms.correlation)
        output.correlation = decimated(terms.correlation)
        if rank:
            output.feature_gram = feature_gram(features)
            output.feature_sample = min(len(features), RANKME_STEP_ROWS)
    return output


def read_logged_step(output: StepOutput, clock: StepClock, worker: distributed.Worker,
                      global_batch: int) -> dict[str, float]:
    """A logged step's measurements, read with one transfer from the device (which the loss's read waits for
    anyway), then the host's clock; RankMe from the Gram matrix that came with them, if any."""
    observed = [output.embedding_std, output.correlation_diagonal, output.correlation_off_diagonal]
    assert all(value is not None for value in observed)  # a logged step is observed
    scalars = torch.stack([value.double() for value in (output.loss, output.on_diag, output.off_diag, *observed)
                           if value is not None])
    gram = output.feature_gram
    values = (scalars if gram is None else torch.cat([scalars, gram.flatten()])).cpu()  # the one transfer
    loss, on_diag, off_diag, spread, diagonal, off_diagonal = values[:len(scalars)].tolist()
    step_time, data_wait = clock.read()
    images_per_s = global_batch / step_time
    return dict(loss=loss, loss_on_diag=on_diag, loss_off_diag=off_diag, step_time=step_time,
                images_per_s=images_per_s, images_per_s_per_worker=images_per_s / worker.world_size,
                data_wait=data_wait, peak_memory_gib=peak_memory_gib(worker.device), embedding_std=spread,
                correlation_diagonal=diagonal, correlation_off_diagonal=off_diagonal,
                **({} if gram is None else dict(rankme=rankme_of_gram(values[len(scalars):].view(gram.shape)),
                                                rankme_sample=output.feature_sample)))
