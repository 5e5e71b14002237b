"""The evaluation pictures: retrieval examples (hits framed green) and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from align_lightning.eval.visualize import confusion_matrix_image, retrieval_examples_image


def test_retrieval_examples_frame_hits_green_and_misses_red(tmp_path: Path) -> None:
    paths = []
    for i, colour in enumerate(("blue", "yellow", "white")):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (50, 40), colour).save(paths[-1])
    picture = retrieval_examples_image(
        ["a blue square", "a yellow square"],
        [paths, [paths[1], paths[0], str(tmp_path / "missing.png")]],
        [[True, False, False], [True, False, False]],
        thumb=20,
        text_width=100,
    )
    border, gap, header, cell = 5, 8, 28, 30
    assert picture.size == (100 + 3 * (cell + gap) + gap, header + 2 * (cell + gap) + gap)

    def frame(row: int, column: int) -> tuple[int, int, int]:
        return picture.getpixel((100 + column * (cell + gap) + 1, header + gap + row * (cell + gap) + 1))

    def inside(row: int, column: int) -> tuple[int, int, int]:
        return picture.getpixel((100 + column * (cell + gap) + border + 10, header + gap + row * (cell + gap) + 15))

    assert frame(0, 0) == (34, 139, 34)
    assert frame(0, 1) == frame(1, 2) == (200, 40, 40)
    assert inside(0, 0) == (0, 0, 255)  # the thumbnail of the blue image
    assert inside(1, 0) == (255, 255, 0)
    assert inside(1, 2) == (128, 128, 128)  # an unreadable image is drawn grey, not an error


def test_confusion_matrix_is_row_normalised_and_labelled() -> None:
    counts = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    picture = confusion_matrix_image(counts, ["cat", "dog", "bird"], size=90)
    cell = 30
    width, height = picture.size
    left, top = width - 12 - 3 * cell, height - 12 - 3 * cell

    def shade(row: int, column: int) -> tuple[int, int, int]:
        return picture.getpixel((left + column * cell + cell // 2, top + row * cell + cell // 2))

    assert shade(1, 1) == (8, 48, 107)  # 2 of 2: full colour
    assert shade(0, 2) == shade(2, 2) == (255, 255, 255)  # nothing (an empty class stays white)
    expected = tuple(round(255 - (255 - c) * 0.75) for c in (8, 48, 107))
    assert shade(0, 0) == expected  # 3 of 4
    assert sum(shade(0, 1)) > sum(shade(0, 0))  # 1 of 4 is lighter
    assert left > 12  # room for the class names


def test_confusion_matrix_checks_its_shape() -> None:
    with pytest.raises(ValueError, match="3 class names"):
        confusion_matrix_image(torch.zeros(2, 2), ["a", "b", "c"])
    big = confusion_matrix_image(torch.eye(1000, dtype=torch.long), [str(i) for i in range(1000)])
    assert big.width >= 1000  # one pixel per cell at least, no labels
