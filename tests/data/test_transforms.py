"""Tests for align_lightning/data/transforms.py."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

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
    resize = transform.transforms[0]
    assert list(resize.size) == [346, 346]


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
