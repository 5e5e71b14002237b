"""Tests for align_lightning/data/transforms.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from align_lightning.data import image_transform


def _image(width: int = 400, height: int = 300) -> Image.Image:
    return Image.new("RGB", (width, height), color=(255, 0, 128))


def test_align_train_and_eval_shapes_and_range() -> None:
    for train in (True, False):
        out = image_transform(289, train=train)(_image())
        assert out.shape == (3, 289, 289)
        assert out.dtype == torch.float32
    # [-1, 1] pixel scaling: 255 -> 1, 0 -> -1, 128 -> 128/127.5 - 1.
    pixel = image_transform(16, train=False)(_image())[:, 8, 8]
    torch.testing.assert_close(pixel, torch.tensor([1.0, -1.0, 128 / 127.5 - 1]))


def test_default_resize_is_alings_346_for_289() -> None:
    transform = image_transform(289, train=False)
    assert transform.resize_size == 346
    resize = transform.tensor_pipeline.transforms[0]
    assert list(resize.size) == [346, 346]


def _photo(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).normal(0, 12, (height, width, 3))
    pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (1024, 768), (300, 300)])
def test_fused_pil_path_equals_resize_then_crop(size: tuple[int, int]) -> None:
    """The fused crop-resize gives torchvision's resize -> crop -> flip -> normalise pixels."""
    image = _photo(*size)
    transform = image_transform(289, train=True)
    resized = F.to_image(F.resize(image, [346, 346], antialias=True))
    for top, left, flip in [(0, 0, False), (57, 57, True), (13, 40, False), (28, 28, True)]:
        expected = F.crop(resized, top, left, 289, 289)
        if flip:
            expected = F.horizontal_flip(expected)
        expected = expected.float() / 127.5 - 1
        # Within one 8-bit level on average: only rounding of the boundary weights differs.
        assert (transform.crop(image, top, left, flip) - expected).abs().mean() < 1 / 127.5
    # Evaluation takes the central crop, deterministically.
    evaluation = image_transform(289, train=False)
    torch.testing.assert_close(evaluation(image), evaluation.crop(image, 28, 28, False))


def test_imagenet_normalisation_and_tensor_input() -> None:
    out = image_transform(32, train=True, normalize="imagenet")(torch.full((3, 50, 60), 255, dtype=torch.uint8))
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(
        out[:, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    )


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="normalize"):
        image_transform(32, normalize="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resize_size"):
        image_transform(32, resize_size=16)
