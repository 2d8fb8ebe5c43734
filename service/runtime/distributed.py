"""Process-group lifecycle and the few collectives the method needs.

Workers are started by torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK; they are read afresh at every
start, so a restarted (possibly resized) worker group simply initialises again. A plain `python` process is a
world of one and never creates a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from service.errors import SpecError


@dataclass(frozen=True)
class Worker:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(device: str = "auto") -> Worker:
    """Choose the device and, under torchrun with more than one worker, join the default process group."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = launched_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise SpecError("run.device=cuda was asked for, but this machine has no usable CUDA device: "
                            "use run.device=auto or cpu")
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        store, _, _ = next(dist.rendezvous("env://"))
        # torchrun's agent keeps its store across restarts of the worker group: without a namespace per attempt,
        # a restarted worker can read a dead peer's address from the previous attempt and fail to connect.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", store=dist.PrefixStore(f"barlow/attempt-{attempt}", store),
            rank=rank, world_size=world_size, device_id=chosen if use_cuda else None,
        )
    return Worker(rank, world_size, local_rank, chosen)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over workers, differentiably: the backward pass sums the incoming gradients over workers too.

    With every worker computing the same global loss from such sums, each worker's gradient is W times its
    share of the true gradient, and DDP's average over W workers yields exactly the true gradient.
    """
    if world_size() == 1:
        return tensor
    return _AllReduceSum.apply(tensor)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def shard(count: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of `count` items: every item in exactly one share, sizes differing by one."""
    return range(rank * count // world_size, (rank + 1) * count // world_size)


def row_counts(rows: int, global_batch: int | None = None, device: torch.device | None = None) -> list[int]:
    """Every worker's row count, in rank order; `rows` is this worker's.

    With the global batch known, the counts are its shards (GlobalBatchSampler's slices): no communication and no
    wait for the device. Without it they are exchanged, and reading them back waits for the device.
    """
    world, me = world_size(), rank()
    if global_batch is not None:
        counts = [len(shard(global_batch, r, world)) for r in range(world)]
        if rows != counts[me]:
            raise ValueError(
                f"worker {me} of {world} holds {rows} rows, but its share of the global batch {global_batch} is "
                f"{counts[me]} rows (shard(global_batch, rank, world_size)): pass the global batch the workers split"
            )
        return counts
    if world == 1:
        return [rows]
    reduced = torch.zeros(world, dtype=torch.long, device=device)
    reduced[me] = rows
    dist.all_reduce(reduced)
    return reduced.tolist()


def gather_rows(tensor: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Every worker's rows, detached, one tensor per rank (this worker's included); `counts` as row_counts gives."""
    tensor = tensor.detach()
    if world_size() == 1:
        return [tensor]
    # all_gather needs equal sizes, and the shares may differ by one row.
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return [part[:count] for part, count in zip(parts, counts)]


class _ScaleGradByWorld(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.world = world_size()
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * ctx.world


def scale_grad_by_world(tensor: torch.Tensor) -> torch.Tensor:
    """Identity forward, gradient times W backward.

    For a global loss every worker computes from gathered rows: a worker's own rows' gradient is then already the
    full one, with no communication, and times W (as all_reduce_sum's) DDP's average gives the true gradient.
    """
    if world_size() == 1:
        return tensor
    return _ScaleGradByWorld.apply(tensor)


def compress_gradients(model: torch.nn.parallel.DistributedDataParallel, dtype: str) -> None:
    """All-reduce `model`'s gradients in bf16 or fp16 (PyTorch's DDP compression hooks); "none" keeps fp32."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hooks = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}
    if dtype in hooks:
        model.register_comm_hook(state=None, hook=hooks[dtype])


def local_world_size() -> int:
    """Training workers on this node (torchrun's LOCAL_WORLD_SIZE; 1 for a plain process)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def spans_nodes() -> bool:
    """Whether the workers are on more than one node (torchrun's LOCAL_WORLD_SIZE is the workers per node)."""
    return world_size() > int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def new_cpu_group():
    """A separate gloo group (collective: every worker must call it in the same order); None in a world of one.

    Checkpoint uploads and the pre-emption vote run their collectives there, off the training step's group.
    """
    if world_size() == 1:
        return None
    return dist.new_group(backend="gloo")
