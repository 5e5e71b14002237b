"""Contrastive gradient caching: the negatives of a whole batch with the memory of a micro-batch.

Plain gradient accumulation does not enlarge a contrastive batch: each micro-batch's loss only
sees its own negatives. Gradient caching (Gao et al., 2021, "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup") computes the *full-batch* loss exactly in three passes:

1. embed every micro-batch without an autograd graph (only the ``(B, D)`` embeddings are kept);
2. compute the loss over all embeddings (of all ranks, through the usual all-gather) and its
   gradients with respect to the embeddings and the logit scale;
3. embed each micro-batch again, with a graph, and back-propagate the cached embedding gradients
   through it (``backward`` of ``<embeddings, cached gradients>``), one micro-batch at a time.

The parameter gradients summed over the micro-batches are those of the full batch, because the
loss only reaches the parameters through the embeddings. Two things must make pass 3 produce the
very embeddings of pass 1: the random state (dropout, drop-path) is saved before each micro-batch
in pass 1 and restored before its re-embedding, and BatchNorm layers normalise each micro-batch
with its own statistics in both passes but update their running statistics only in pass 3 (once).
BatchNorm statistics are therefore per micro-batch, like ALIGN's per-core batch statistics
(16 pairs per TPU core in the paper). Data augmentation happens in the data pipeline, before the
step, so both passes see the same pixels and tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GradCache", "split_batch"]

#: ``encode(batch) -> (image_embeds, text_embeds, logit_scale)``, e.g. a :class:`DualEncoder`'s forward.
Encoder = Callable[[Mapping[str, Any]], tuple[Tensor, Tensor, Tensor]]
#: ``loss(image_embeds, text_embeds, logit_scale) -> {"loss": ..., ...}``, e.g. :class:`ContrastiveLoss`.
LossFn = Callable[[Tensor, Tensor, Tensor], Mapping[str, Tensor]]


def split_batch(batch: Mapping[str, Any], size: int) -> list[dict[str, Any]]:
    """Split a batch dict into micro-batches of at most ``size`` rows.

    Tensors and lists/tuples whose length is the batch size are split; other entries (e.g. a
    scalar) are repeated in every micro-batch.

    Args:
        batch: The batch; its size is taken from ``input_ids`` (else its first tensor).
        size: Rows per micro-batch.

    Returns:
        The micro-batches, in order.

    Raises:
        ValueError: If ``size`` is not positive or the batch has no tensor to take its size from.
    """
    if size < 1:
        raise ValueError(f"micro-batch size must be positive, got {size}.")
    tensors = [value for value in batch.values() if isinstance(value, Tensor) and value.ndim > 0]
    if "input_ids" in batch:
        rows = len(batch["input_ids"])
    elif tensors:
        rows = len(tensors[0])
    else:
        raise ValueError(f"cannot split a batch without tensors (keys {sorted(batch)}).")
    starts = range(0, rows, size)
    chunks: list[dict[str, Any]] = [{} for _ in starts]
    for key, value in batch.items():
        splittable = (isinstance(value, Tensor) and value.ndim > 0 and len(value) == rows) or (
            isinstance(value, list | tuple) and len(value) == rows
        )
        for chunk, start in zip(chunks, starts, strict=True):
            chunk[key] = value[start : start + size] if splittable else value
    return chunks


@contextmanager
def batchnorm_statistics_frozen(module: nn.Module) -> Iterator[None]:
    """Within the context, training-mode BatchNorm layers normalise with the batch's statistics but do not
    update their running statistics (nor ``num_batches_tracked``)."""
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


class GradCache:
    """Exact full-batch contrastive gradients computed one micro-batch at a time (see the module docstring).

    Usable in any training loop::

        cache = GradCache(model, ContrastiveLoss(), micro_batch_size=64, modules=model)
        terms, last = cache.step(batch, backward=torch.Tensor.backward)
        last.backward()  # the last micro-batch's backward (under DDP/FSDP: the one that synchronises)
        optimizer.step(); optimizer.zero_grad()

    :class:`~align_lightning.ALIGNModule` does this with ``micro_batch_size`` (Lightning performs
    the last backward, so clipping, accumulation and mixed precision work as usual).

    Memory: the embeddings of the whole batch (``2 x B x D``) plus one micro-batch's activations.
    Time: one extra forward pass of the towers (pass 1) over plain training.

    Args:
        encode: Maps a (micro-)batch to ``(image_embeds, text_embeds, logit_scale)``.
        loss: Maps the full batch's embeddings and the logit scale to a dict with ``"loss"``.
        micro_batch_size: Pairs per micro-batch.
        modules: The module(s) ``encode`` runs, whose training-mode BatchNorm layers must not update
            their running statistics in pass 1.

    Raises:
        ValueError: If ``micro_batch_size`` is not positive.
    """

    def __init__(self, encode: Encoder, loss: LossFn, micro_batch_size: int, modules: nn.Module) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}.")
        self.encode = encode
        self.loss = loss
        self.micro_batch_size = micro_batch_size
        self.modules = modules

    def step(
        self,
        batch: Mapping[str, Any],
        backward: Callable[[Tensor], None],
        device: torch.device | None = None,
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Run the three passes, back-propagating every micro-batch but the last.

        Args:
            batch: The full (per-rank) batch.
            backward: Back-propagates a micro-batch's surrogate scalar (e.g. ``Tensor.backward``, or a
                scaled backward without gradient synchronisation under DDP/FSDP). Called for all
                micro-batches but the last.
            device: The device whose random generator dropout uses (CPU's is always restored); default
                the device of the batch's first tensor.

        Returns:
            ``(terms, last, logit_scale)``: the full-batch loss terms (detached); a scalar whose value is
            the full-batch loss and whose ``backward()`` back-propagates the last micro-batch (and the
            logit scale's gradient), completing the gradients; the detached logit scale used.
        """
        chunks = split_batch(batch, self.micro_batch_size)
        if device is None:
            device = next((v.device for v in batch.values() if isinstance(v, Tensor)), torch.device("cpu"))
        # Pass 1: embeddings without graph, remembering each micro-batch's random state.
        states, images, texts = [], [], []
        with torch.no_grad(), batchnorm_statistics_frozen(self.modules):
            for chunk in chunks:
                states.append(_rng_state(device))
                image_embeds, text_embeds, logit_scale = self.encode(chunk)
                images.append(image_embeds)
                texts.append(text_embeds)
        end_state = _rng_state(device)
        # Pass 2: the full-batch loss and its gradients with respect to the embeddings and the scale.
        image_leaf = torch.cat(images).detach().requires_grad_()
        text_leaf = torch.cat(texts).detach().requires_grad_()
        scale_leaf = logit_scale.detach().requires_grad_()
        with torch.enable_grad():
            terms = dict(self.loss(image_leaf, text_leaf, scale_leaf))
            image_grad, text_grad, scale_grad = torch.autograd.grad(terms["loss"], (image_leaf, text_leaf, scale_leaf))
        image_grads = image_grad.split([len(e) for e in images])
        text_grads = text_grad.split([len(e) for e in texts])
        # Pass 3: each micro-batch again, with graph, under its pass-1 random state.
        last = len(chunks) - 1
        for index, chunk in enumerate(chunks):
            _set_rng_state(states[index], device)
            with torch.enable_grad():
                image_embeds, text_embeds, logit_scale = self.encode(chunk)
                surrogate = (image_embeds.float() * image_grads[index]).sum() + (
                    text_embeds.float() * text_grads[index]
                ).sum()
                if index == last:
                    surrogate = surrogate + (logit_scale.float() * scale_grad).sum()
            if index < last:
                backward(surrogate)
        _set_rng_state(end_state, device)
        detached = {key: value.detach() for key, value in terms.items()}
        # The value of the full-batch loss (for whoever reads it: logs, callbacks), the gradient of the surrogate.
        last_backward = surrogate + (detached["loss"] - surrogate.detach())
        return detached, last_backward, scale_leaf.detach()
