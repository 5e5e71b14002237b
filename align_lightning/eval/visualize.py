"""Pictures of an evaluation: retrieval examples and a zero-shot confusion matrix (PIL only, no plotting library)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

__all__ = ["confusion_matrix_image", "retrieval_examples_image"]

_HIT = (34, 139, 34)
_MISS = (200, 40, 40)
_INK = (20, 20, 20)
_BLUE = (8, 48, 107)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _thumbnail(path: str, side: int) -> Image.Image:
    try:
        with Image.open(path) as image:
            return ImageOps.fit(image.convert("RGB"), (side, side))
    except OSError:  # unreadable: a grey square rather than no picture
        return Image.new("RGB", (side, side), (128, 128, 128))


def retrieval_examples_image(
    queries: Sequence[str],
    results: Sequence[Sequence[str]],
    hits: Sequence[Sequence[bool]],
    thumb: int = 112,
    text_width: int = 300,
) -> Image.Image:
    """Caption queries (left) with their top retrieved images (right), each framed green if it is the caption's image.

    Args:
        queries: The caption of each row.
        results: Each row's retrieved image paths, best first.
        hits: Whether each retrieved image is the query's own image.
        thumb: Thumbnail side in pixels.
        text_width: Width of the caption column in pixels.

    Returns:
        An RGB picture.
    """
    border, gap, header = 5, 8, 28
    columns = max((len(row) for row in results), default=0)
    cell = thumb + 2 * border
    width = text_width + columns * (cell + gap) + gap
    height = header + len(queries) * (cell + gap) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    title_font, font = _font(15), _font(13)
    draw.text((gap, 6), "caption query", fill=_INK, font=title_font)
    draw.text((text_width, 6), "top images (green: the caption's own image)", fill=_INK, font=title_font)
    characters = max(10, text_width // 8)
    for row, (query, paths, row_hits) in enumerate(zip(queries, results, hits, strict=True)):
        top = header + gap + row * (cell + gap)
        lines = textwrap.wrap(query, characters)[: max(1, cell // 16)]
        draw.multiline_text((gap, top + 4), "\n".join(lines), fill=_INK, font=font, spacing=3)
        for column, (path, hit) in enumerate(zip(paths, row_hits, strict=True)):
            left = text_width + column * (cell + gap)
            draw.rectangle((left, top, left + cell - 1, top + cell - 1), fill=_HIT if hit else _MISS)
            canvas.paste(_thumbnail(path, thumb), (left + border, top + border))
    return canvas


def confusion_matrix_image(counts: torch.Tensor, classnames: Sequence[str], size: int = 640) -> Image.Image:
    """A row-normalised confusion matrix as a heat map (rows: true class, columns: predicted class).

    Class names label the rows when there are at most 64 classes; larger matrices (ImageNet's
    1,000) are drawn one pixel or more per cell without labels.

    Args:
        counts: ``(C, C)`` counts, ``counts[t, p]`` = images of class ``t`` predicted as ``p``.
        classnames: The ``C`` class names.
        size: Approximate side of the matrix in pixels.

    Returns:
        An RGB picture.
    """
    classes = counts.shape[0]
    if counts.shape != (classes, classes) or len(classnames) != classes:
        raise ValueError(f"counts must be (C, C) with C = {len(classnames)} class names, got {tuple(counts.shape)}.")
    counts = counts.double()
    rows = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    cell = max(1, min(32, size // classes))
    labelled = classes <= 64
    font = _font(12)
    left = 12 + (max(len(f"{i} {n[:24]}") for i, n in enumerate(classnames)) * 7 if labelled else 0)
    top = 30 + (18 if labelled else 0)
    side = classes * cell
    canvas = Image.new("RGB", (left + side + 12, top + side + 12), "white")
    # Heat: white (0) to dark blue (1), one pixel per cell, then scaled up without smoothing.
    heat = torch.stack([255 - (255 - c) * rows for c in _BLUE], dim=-1).round().to(torch.uint8)
    canvas.paste(Image.fromarray(heat.numpy(), "RGB").resize((side, side), Image.Resampling.NEAREST), (left, top))
    draw = ImageDraw.Draw(canvas)
    accuracy = float(counts.diagonal().sum() / counts.sum().clamp_min(1))
    title = f"rows: true class, columns: predicted (row-normalised); top-1 {accuracy:.3f}"
    draw.text((12, 8), title, fill=_INK, font=font)
    if labelled:
        for i, name in enumerate(classnames):
            draw.text((12, top + i * cell + max(0, (cell - 12) // 2)), f"{i} {name[:24]}", fill=_INK, font=font)
            if cell >= 14 or i % 5 == 0:
                draw.text((left + i * cell + 2, top - 16), str(i), fill=_INK, font=font)
    return canvas
