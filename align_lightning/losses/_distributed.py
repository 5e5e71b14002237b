"""All-gather with gradients, for in-batch negatives from every rank."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_with_grad", "distributed_world"]


def distributed_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """Return ``(rank, world_size)`` of ``group``, or ``(0, 1)`` when not running distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's rows; the backward pass returns to each rank the summed gradient
    of its own rows.

    Every rank computes its loss against the gathered rows, so the gradient of a rank's rows is
    the sum of what all ranks' losses send back to them: an all-reduce (or, where the backend has
    it and the sizes are equal, the cheaper reduce-scatter) of the gathered gradient, then this
    rank's slice. With DDP's gradient averaging this gives exactly the single-process gradient.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, sizes: list[int], rank: int, group: dist.ProcessGroup | None) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        longest = max(sizes)
        tensor = tensor.contiguous()
        if tensor.shape[0] != longest:  # all_gather needs equal shapes: pad, gather, then trim
            padding = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
            tensor = torch.cat([tensor, padding])
        chunks = [torch.empty_like(tensor) for _ in sizes]
        dist.all_gather(chunks, tensor, group=group)
        return torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        sizes, rank, group = ctx.sizes, ctx.rank, ctx.group
        grad = grad.contiguous()
        uniform = len(set(sizes)) == 1
        if uniform and dist.get_backend(group) != dist.Backend.GLOO:
            local = grad.new_empty((sizes[rank], *grad.shape[1:]))
            dist.reduce_scatter_tensor(local, grad, op=dist.ReduceOp.SUM, group=group)
            return local, None, None, None
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
        start = sum(sizes[:rank])
        return grad[start : start + sizes[rank]], None, None, None


def all_gather_with_grad(tensor: Tensor, group: dist.ProcessGroup | None = None) -> tuple[Tensor, int]:
    """Gather ``tensor``'s rows from all ranks of ``group``, keeping the autograd graph.

    Ranks may hold different numbers of rows (e.g. a short last batch); their sizes are exchanged
    first (one small collective).

    Args:
        tensor: ``(B_local, ...)`` rows of this rank.
        group: Process group; the default group when ``None``.

    Returns:
        ``(gathered, offset)``: the ``(B_global, ...)`` rows of all ranks in rank order, and the
        index of this rank's first row in them. Without an initialised process group (or with one
        rank), ``(tensor, 0)``.
    """
    rank, world_size = distributed_world(group)
    if world_size == 1:
        return tensor, 0
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    all_sizes = [torch.empty_like(size) for _ in range(world_size)]
    dist.all_gather(all_sizes, size, group=group)
    sizes = [int(s.item()) for s in all_sizes]
    gathered = _AllGatherWithGrad.apply(tensor, sizes, rank, group)
    return gathered, sum(sizes[:rank])
