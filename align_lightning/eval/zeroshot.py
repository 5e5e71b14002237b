"""Zero-shot classification from a dual encoder: prompt-ensembled class embeddings and top-k accuracy."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["IMAGENET_TEMPLATES", "topk_accuracy", "zeroshot_classifier"]

logger = logging.getLogger(__name__)

#: CLIP's 80 ImageNet prompt templates (Radford et al. 2021, openai/CLIP
#: ``notebooks/Prompt_Engineering_for_ImageNet.ipynb``), in CLIP's order; ``{}`` is the class name.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)


class TextEncoder(Protocol):
    """Anything with ``encode_text(input_ids, attention_mask)`` returning L2-normalised ``(B, D)`` embeddings."""

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...


def _fingerprint(classnames: Sequence[str], templates: Sequence[str]) -> str:
    """SHA-256 of the class names and templates (order included)."""
    payload = json.dumps({"classnames": list(classnames), "templates": list(templates)}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


@torch.no_grad()
def zeroshot_classifier(
    model: TextEncoder,
    classnames: Sequence[str],
    templates: Sequence[str],
    tokenizer: Any,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    cache_path: str | Path | None = None,
) -> Tensor:
    """Zero-shot classifier weights: one prompt-ensembled text embedding per class (ALIGN/CLIP protocol).

    A class embedding is the mean over templates of the L2-normalised text embeddings of
    ``template.format(classname)``, L2-normalised again. Image logits are then
    ``image_embeds @ weights`` (times the logit scale, which does not change the ranking).

    Args:
        model: Has ``encode_text(input_ids, attention_mask)`` returning L2-normalised embeddings.
        classnames: Class names, in label order.
        templates: Prompt templates, each holding ``{}`` where the class name goes.
        tokenizer: A Hugging Face tokenizer (called with ``padding``, ``truncation``, ``return_tensors="pt"``).
        batch_size: Prompts per ``encode_text`` call.
        device: Where the prompts are encoded (default: the device of the model's first parameter, else CPU).
        cache_path: If given, class embeddings are loaded from this file when its fingerprint of
            ``classnames`` and ``templates`` matches, and (re)computed and saved there otherwise.
            The model is not part of the fingerprint: use one cache file per model checkpoint.

    Returns:
        ``(D, C)`` float tensor of L2-normalised class embeddings (columns), on ``device``.

    Raises:
        ValueError: If there are no classes or templates, a template lacks ``{}``, or ``batch_size < 1``.
    """
    if not classnames or not templates:
        raise ValueError("zeroshot_classifier needs at least one class name and one template.")
    if any("{}" not in template for template in templates):
        raise ValueError("Every template must contain '{}' where the class name goes.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if device is None:
        parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device)
    fingerprint = _fingerprint(classnames, templates)
    if cache_path is not None and Path(cache_path).is_file():
        cached = torch.load(cache_path, map_location=device, weights_only=True)
        if isinstance(cached, dict) and cached.get("fingerprint") == fingerprint:
            return cached["weights"]
        logger.info("Zero-shot cache %s was made for other class names or templates: recomputing.", cache_path)

    prompts = [template.format(name) for name in classnames for template in templates]  # class-major
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
        embeds = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        chunks.append(F.normalize(embeds.float(), dim=-1))
    embeds = torch.cat(chunks).view(len(classnames), len(templates), -1)
    weights = F.normalize(embeds.mean(dim=1), dim=-1).T.contiguous()
    if cache_path is not None:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"fingerprint": fingerprint, "weights": weights.cpu()}, cache_path)
    return weights


@torch.no_grad()
def topk_accuracy(logits_or_scores: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy: the fraction of rows whose target class is among the k highest scores.

    Ties are decided by ``torch.topk`` (as CLIP_benchmark's ``accuracy`` and open_clip do).

    Args:
        logits_or_scores: ``(N, C)`` scores.
        targets: ``(N,)`` class indices.
        ks: The k values; a k above C is clamped to C (always a hit).

    Returns:
        ``{"top1": ..., "top5": ...}`` (one ``top{k}`` key per requested k, named by the requested k).

    Raises:
        ValueError: On inconsistent shapes or a k below 1.
    """
    if logits_or_scores.ndim != 2 or targets.shape != (logits_or_scores.shape[0],):
        raise ValueError(
            f"Expected (N, C) scores and (N,) targets, got {tuple(logits_or_scores.shape)} and {tuple(targets.shape)}."
        )
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive, got {tuple(ks)}.")
    num_classes = logits_or_scores.shape[1]
    max_k = min(max(ks), num_classes)
    top = logits_or_scores.topk(max_k, dim=1).indices
    correct = top == targets.to(top.device).unsqueeze(1)
    num = max(len(targets), 1)
    return {f"top{k}": correct[:, : min(k, num_classes)].any(dim=1).sum().item() / num for k in ks}
