"""CLIP_benchmark plug-in: evaluate align_lightning checkpoints with ``clip_benchmark``.

CLIP_benchmark (``pip install clip-benchmark``) picks a model loader by ``--model_type`` from its
``clip_benchmark.models.TYPE2FUNC`` table and has no plug-in entry points, so this module adds the
``align_lightning`` type to that table (:func:`register`) and offers its command line with the type
registered::

    python -m align_lightning clip_benchmark eval --model_type align_lightning \\
        --pretrained runs/align_base/version_0/checkpoints/last.ckpt --model align_base \\
        --dataset flickr30k --dataset_root data/flickr30k --task zeroshot_retrieval --recall_k 1 5 10

``--pretrained`` is the checkpoint; ``--model`` is only a label in the output file's name. CLIP_benchmark runs
under ``torch.autocast`` unless given ``--no_amp`` (on CPU that means bfloat16): pass ``--no_amp`` for
float32 numbers that equal ``validate`` with ``recipes/eval_*.yaml``.

From Python, :func:`load_align_lightning` returns CLIP_benchmark's ``(model, transform, tokenizer)`` triple
for its ``clip_benchmark.metrics.*.evaluate`` functions.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from align_lightning.data.collate import ImageTextCollator
from align_lightning.data.transforms import AlignImageTransform
from align_lightning.inference import load_checkpoint
from align_lightning.model.dual_encoder import DualEncoder

__all__ = ["MODEL_TYPE", "CLIPBenchmarkModel", "CLIPBenchmarkTokenizer", "load_align_lightning", "main", "register"]

#: The ``--model_type`` under which :func:`register` adds the loader.
MODEL_TYPE = "align_lightning"


class CLIPBenchmarkTokenizer:
    """CLIP_benchmark's tokenizer interface: a list of texts -> one ``(B, L)`` tensor of token ids.

    Texts are cleaned and tokenised as in training (:class:`~align_lightning.data.ImageTextCollator`); padding
    uses the tokenizer's pad id, from which :class:`CLIPBenchmarkModel` rebuilds the attention mask.

    Args:
        tokenizer: The checkpoint's Hugging Face tokenizer.
        max_length: Maximum tokens per text.
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token: CLIP_benchmark's single-tensor interface needs one.")
        self.pad_token_id = int(tokenizer.pad_token_id)
        self._collator = ImageTextCollator(tokenizer, max_length=max_length)

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        """Token ids ``(B, L)``, padded with the pad id to the longest text."""
        return self._collator.tokenize([texts] if isinstance(texts, str) else list(texts))["input_ids"]


class CLIPBenchmarkModel(nn.Module):
    """A :class:`~align_lightning.model.DualEncoder` with CLIP_benchmark's calling convention.

    ``encode_image(images)`` as is; ``encode_text(input_ids)`` with a single tensor, the attention mask being
    ``input_ids != pad_token_id`` (the convention of open_clip's Hugging Face text towers). Both return
    L2-normalised embeddings (CLIP_benchmark normalises again, which changes nothing).

    Args:
        encoder: The dual encoder.
        pad_token_id: The tokenizer's pad id.
    """

    def __init__(self, encoder: DualEncoder, pad_token_id: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.pad_token_id = pad_token_id

    def encode_image(self, images: Tensor) -> Tensor:
        """``(B, D)`` L2-normalised image embeddings of preprocessed ``(B, 3, S, S)`` images."""
        return self.encoder.encode_image(images)

    def encode_text(self, input_ids: Tensor) -> Tensor:
        """``(B, D)`` L2-normalised text embeddings of ``(B, L)`` token ids padded with the pad id."""
        return self.encoder.encode_text(input_ids, (input_ids != self.pad_token_id).long())

    def forward(self, images: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(image_embeds, text_embeds)``."""
        return self.encode_image(images), self.encode_text(input_ids)


def load_align_lightning(
    model_name: str = MODEL_TYPE,
    pretrained: str = "",
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> tuple[CLIPBenchmarkModel, AlignImageTransform, CLIPBenchmarkTokenizer]:
    """CLIP_benchmark loader (a ``TYPE2FUNC`` entry) for an align_lightning checkpoint.

    Args:
        model_name: CLIP_benchmark's ``--model``; only a label here (the checkpoint records its architecture).
        pretrained: Path of the ``.ckpt`` written by ``python -m align_lightning fit``.
        device: Where the model runs.
        cache_dir: Unused (nothing is downloaded); part of CLIP_benchmark's loader signature.

    Returns:
        ``(model, transform, tokenizer)``: the model (eval mode, on ``device``) with ``encode_image`` /
        ``encode_text``, the checkpoint's evaluation transform (PIL image -> tensor) and a tokenizer mapping a
        list of texts to a tensor of token ids.

    Raises:
        FileNotFoundError, ValueError: As :func:`~align_lightning.inference.load_checkpoint`.
    """
    del model_name, cache_dir  # part of the loader interface, not needed
    if not pretrained:
        raise ValueError("Pass the checkpoint as --pretrained (CLIP_benchmark's `pretrained`): a .ckpt file.")
    loaded = load_checkpoint(pretrained, device=device)
    tokenizer = CLIPBenchmarkTokenizer(loaded.tokenizer, loaded.max_length)
    model = CLIPBenchmarkModel(loaded.encoder, tokenizer.pad_token_id).eval()
    return model, loaded.transform, tokenizer


def register() -> None:
    """Add ``align_lightning`` to CLIP_benchmark's model types (idempotent).

    ``clip_benchmark.models`` keeps the loaders in ``TYPE2FUNC`` and the valid ``--model_type`` values in the
    list ``MODEL_TYPES`` (which its CLI imports by reference): both are extended in place.

    Raises:
        ImportError: If CLIP_benchmark is not installed.
    """
    try:
        from clip_benchmark import models
    except ImportError as err:
        raise ImportError("CLIP_benchmark is not installed: pip install clip-benchmark") from err
    models.TYPE2FUNC[MODEL_TYPE] = load_align_lightning
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m align_lightning clip_benchmark ...``: CLIP_benchmark's command line with ``align_lightning``
    registered as a ``--model_type``.

    Args:
        argv: CLIP_benchmark's arguments (``eval --model_type align_lightning --pretrained CKPT ...``);
            ``None``: ``sys.argv[1:]``.
    """
    register()
    from clip_benchmark.cli import main as clip_benchmark_main

    arguments = list(sys.argv[1:] if argv is None else argv)
    program, saved = "clip_benchmark", sys.argv
    sys.argv = [program, *arguments]  # its parser reads sys.argv
    try:
        clip_benchmark_main()
    finally:
        sys.argv = saved
