"""Cross-entropy over similarity logits computed tile by tile: the ``B_local x B_global`` logits never exist.

:func:`blockwise_cross_entropy` returns ``sum_i CE(scale * q_i . K^T, target offset + i)`` (with label
smoothing) for queries ``q`` against keys ``K``. Forward: the log-sum-exp of each row is accumulated
over key tiles with a running maximum (the streaming / "online" softmax), together with the row sums
the label smoothing needs. Backward (a custom autograd Function): each tile's logits are recomputed,
``d logits = softmax - target distribution``, and the tile's share of the query, key and scale
gradients is accumulated. Peak extra memory is ``O(B_local x block_size)`` in both passes, instead
of the dense ``O(B_local x B_global)``; the price is one more matrix product per tile (backward
recomputes the logits): 4 products instead of the dense loss's 3.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["blockwise_cross_entropy", "symmetric_blockwise_cross_entropy"]


class _BlockwiseCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, queries: Tensor, keys: Tensor, scale: Tensor, offset: int, smoothing: float, block_size: int
    ) -> Tensor:
        rows, columns = queries.shape[0], keys.shape[0]
        running_max = queries.new_full((rows,), float("-inf"))
        running_sum = queries.new_zeros(rows)
        row_total = queries.new_zeros(rows)
        for start in range(0, columns, block_size):
            logits = scale * (queries @ keys[start : start + block_size].T)
            if smoothing:
                row_total += logits.sum(dim=1)
            new_max = torch.maximum(running_max, logits.max(dim=1).values)
            running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(logits - new_max[:, None]).sum(1)
            running_max = new_max
        log_sum_exp = running_max + torch.log(running_sum)
        positive = scale * (queries * keys[offset : offset + rows]).sum(dim=1)
        loss = (log_sum_exp - (1.0 - smoothing) * positive - (smoothing / columns) * row_total).sum()
        ctx.save_for_backward(queries, keys, scale, log_sum_exp)
        ctx.offset, ctx.smoothing, ctx.block_size = offset, smoothing, block_size
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        queries, keys, scale, log_sum_exp = ctx.saved_tensors
        offset, smoothing, block_size = ctx.offset, ctx.smoothing, ctx.block_size
        rows, columns = queries.shape[0], keys.shape[0]
        grad_queries = torch.zeros_like(queries)
        grad_keys = torch.zeros_like(keys)
        grad_scale = torch.zeros((), dtype=queries.dtype, device=queries.device)
        row_index = torch.arange(rows, device=queries.device)
        for start in range(0, columns, block_size):
            stop = min(start + block_size, columns)
            tile = keys[start:stop]
            similarity = queries @ tile.T
            # d loss / d logits = softmax - ((1 - smoothing) one-hot + smoothing / columns), times grad.
            d_logits = torch.exp(scale * similarity - log_sum_exp[:, None]) - smoothing / columns
            targets = row_index + offset
            inside = (targets >= start) & (targets < stop)
            d_logits[row_index[inside], targets[inside] - start] -= 1.0 - smoothing
            d_logits *= grad
            grad_queries += scale * (d_logits @ tile)
            grad_keys[start:stop] += scale * (d_logits.T @ queries)
            grad_scale += (d_logits * similarity).sum()
        needs = ctx.needs_input_grad
        return (
            grad_queries if needs[0] else None,
            grad_keys if needs[1] else None,
            grad_scale.reshape(scale.shape) if needs[2] else None,
            None,
            None,
            None,
        )


def blockwise_cross_entropy(
    queries: Tensor, keys: Tensor, scale: Tensor | float, offset: int, smoothing: float, block_size: int
) -> Tensor:
    """``sum_i CE(scale * queries_i . keys^T, target offset + i)`` with label smoothing, in key tiles.

    Equal (value and gradients, to float32 rounding) to ``F.cross_entropy(scale * queries @ keys.T,
    arange(offset, offset + len(queries)), label_smoothing=smoothing, reduction="sum")``.

    Args:
        queries: ``(b, D)`` float32 rows (this rank's embeddings of one modality).
        keys: ``(n, D)`` float32 columns (all ranks' embeddings of the other modality).
        scale: The logit scale (a scalar tensor, differentiable, or a float).
        offset: Index in ``keys`` of the positive of ``queries[0]``.
        smoothing: Label smoothing in ``[0, 1)``.
        block_size: Keys per tile.

    Returns:
        The summed loss (a 0-dim tensor).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be a positive number of columns, got {block_size}.")
    scale_tensor = scale if isinstance(scale, Tensor) else queries.new_tensor(float(scale))
    return _BlockwiseCrossEntropy.apply(queries, keys, scale_tensor.reshape(()), offset, smoothing, block_size)


class _SymmetricBlockwiseCrossEntropy(torch.autograd.Function):
    """Both directions of one square similarity matrix ``scale * images @ texts^T`` (one process), each tile once."""

    @staticmethod
    def forward(
        ctx: Any, images: Tensor, texts: Tensor, scale: Tensor, smoothing: float, block_size: int
    ) -> tuple[Tensor, Tensor]:
        size = images.shape[0]
        row_max = images.new_full((size,), float("-inf"))
        row_sum = images.new_zeros(size)
        col_max = images.new_full((size,), float("-inf"))
        col_sum = images.new_zeros(size)
        row_total = images.new_zeros(size)
        col_total = images.new_zeros(size)
        for r0 in range(0, size, block_size):
            r1 = min(r0 + block_size, size)
            for c0 in range(0, size, block_size):
                c1 = min(c0 + block_size, size)
                logits = scale * (images[r0:r1] @ texts[c0:c1].T)
                if smoothing:
                    row_total[r0:r1] += logits.sum(dim=1)
                    col_total[c0:c1] += logits.sum(dim=0)
                new_row = torch.maximum(row_max[r0:r1], logits.max(dim=1).values)
                row_sum[r0:r1] = row_sum[r0:r1] * torch.exp(row_max[r0:r1] - new_row) + torch.exp(
                    logits - new_row[:, None]
                ).sum(dim=1)
                row_max[r0:r1] = new_row
                new_col = torch.maximum(col_max[c0:c1], logits.max(dim=0).values)
                col_sum[c0:c1] = col_sum[c0:c1] * torch.exp(col_max[c0:c1] - new_col) + torch.exp(
                    logits - new_col[None, :]
                ).sum(dim=0)
                col_max[c0:c1] = new_col
        row_lse, col_lse = row_max + torch.log(row_sum), col_max + torch.log(col_sum)
        positive = scale * (images * texts).sum(dim=1)
        loss_i2t = (row_lse - (1.0 - smoothing) * positive - (smoothing / size) * row_total).sum()
        loss_t2i = (col_lse - (1.0 - smoothing) * positive - (smoothing / size) * col_total).sum()
        ctx.save_for_backward(images, texts, scale, row_lse, col_lse)
        ctx.smoothing, ctx.block_size = smoothing, block_size
        return loss_i2t, loss_t2i

    @staticmethod
    def backward(ctx: Any, grad_i2t: Tensor, grad_t2i: Tensor) -> tuple[Tensor | None, ...]:
        images, texts, scale, row_lse, col_lse = ctx.saved_tensors
        smoothing, block_size = ctx.smoothing, ctx.block_size
        size = images.shape[0]
        grad_images, grad_texts = torch.zeros_like(images), torch.zeros_like(texts)
        grad_scale = torch.zeros((), dtype=images.dtype, device=images.device)
        uniform = smoothing / size * (grad_i2t + grad_t2i)
        diagonal = (1.0 - smoothing) * (grad_i2t + grad_t2i)
        for r0 in range(0, size, block_size):
            r1 = min(r0 + block_size, size)
            for c0 in range(0, size, block_size):
                c1 = min(c0 + block_size, size)
                similarity = images[r0:r1] @ texts[c0:c1].T
                logits = scale * similarity
                d_logits = grad_i2t * torch.exp(logits - row_lse[r0:r1, None])
                d_logits += grad_t2i * torch.exp(logits - col_lse[None, c0:c1])
                d_logits -= uniform
                low, high = max(r0, c0), min(r1, c1)
                if low < high:  # the tile holds part of the diagonal (the positives)
                    index = torch.arange(low, high, device=images.device)
                    d_logits[index - r0, index - c0] -= diagonal
                grad_images[r0:r1] += scale * (d_logits @ texts[c0:c1])
                grad_texts[c0:c1] += scale * (d_logits.T @ images[r0:r1])
                grad_scale += (d_logits * similarity).sum()
        needs = ctx.needs_input_grad
        return (
            grad_images if needs[0] else None,
            grad_texts if needs[1] else None,
            grad_scale.reshape(scale.shape) if needs[2] else None,
            None,
            None,
        )


def symmetric_blockwise_cross_entropy(
    images: Tensor, texts: Tensor, scale: Tensor | float, smoothing: float, block_size: int
) -> tuple[Tensor, Tensor]:
    """Both directions' summed cross-entropies of one process's ``scale * images @ texts^T``, in square tiles.

    The same values and gradients as two :func:`blockwise_cross_entropy` calls (image rows against the
    texts, text rows against the images) with half the work: each tile is computed once in forward
    and once in backward for both directions (row and column log-sum-exps accumulated together).
    Peak extra memory ``O(block_size^2)`` plus ``O(B)`` vectors.

    Returns:
        ``(loss_i2t, loss_t2i)``, each summed over the rows.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be a positive number of columns, got {block_size}.")
    scale_tensor = scale if isinstance(scale, Tensor) else images.new_tensor(float(scale))
    return _SymmetricBlockwiseCrossEntropy.apply(images, texts, scale_tensor.reshape(()), smoothing, block_size)
