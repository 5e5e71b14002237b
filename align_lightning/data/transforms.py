"""ALIGN's image preprocessing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torchvision.transforms import v2

__all__ = ["image_transform"]

# ALIGN trains at 289 px from a 346 px resize for every EfficientNet size: crop fraction 289/346.
ALIGN_RESIZE_RATIO = 346 / 289

_NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # [-1, 1]: x / 127.5 - 1 (Kakao's reproduction and `align-base`'s preprocessor).
    "align": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


def image_transform(
    image_size: int = 289,
    train: bool = True,
    resize_size: int | None = None,
    normalize: Literal["align", "imagenet", "clip"] | tuple[Sequence[float], Sequence[float]] = "align",
    hflip: bool = True,
) -> v2.Compose:
    """Build ALIGN's train or eval transform for PIL images or uint8 ``(3, H, W)`` tensors.

    Train: resize to ``resize_size`` x ``resize_size`` -> random crop ``image_size`` -> random
    horizontal flip. Eval: resize -> center crop. Then float pixels normalised.

    Args:
        image_size: Output side (ALIGN: 289).
        train: Random crop + flip (training) or center crop (evaluation).
        resize_size: Square resize before cropping; default ``round(image_size * 346 / 289)``.
        normalize: ``"align"`` for pixels in [-1, 1], ``"imagenet"`` / ``"clip"`` mean-std
            normalisation, or an explicit ``(mean, std)`` pair.
        hflip: Random horizontal flip during training.

    Returns:
        A callable mapping an image to a ``(3, image_size, image_size)`` float tensor.
    """
    if resize_size is None:
        resize_size = round(image_size * ALIGN_RESIZE_RATIO)
    if resize_size < image_size:
        raise ValueError(f"resize_size ({resize_size}) must be at least image_size ({image_size}).")
    if isinstance(normalize, str):
        if normalize not in _NORMALIZATIONS:
            raise ValueError(
                f"normalize must be one of {sorted(_NORMALIZATIONS)} or a (mean, std) pair, got {normalize!r}."
            )
        mean, std = _NORMALIZATIONS[normalize]
    else:
        mean, std = normalize
    # Geometry first, on the input as given: resizing a PIL image with PIL is several times faster
    # than converting it to a tensor first.
    steps: list[v2.Transform] = [v2.Resize((resize_size, resize_size), antialias=True)]
    if train:
        steps.append(v2.RandomCrop(image_size))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps.append(v2.CenterCrop(image_size))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(steps)
