"""Write a small dataset in the Karpathy split JSON format (Flickr30K / COCO retrieval files) for tests."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

#: Words of the generated captions (a test tokenizer learns its vocabulary from them).
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")


def write_karpathy(
    root: Path, splits: dict[str, int], captions_per_image: int = 2, size: tuple[int, int] = (40, 36)
) -> tuple[Path, Path]:
    """Write ``splits`` (``{"train": 6, "test": 3}``: images per split) as JPEGs under ``root/images/<split>``.

    Image ``i`` of the file is a flat colour; its captions name the colour and the index.

    Returns:
        ``(annotations, image_root)``: the JSON path and the folder its ``filepath/filename`` are relative to.
    """
    image_root = root / "images"
    entries = []
    index = 0
    for split, count in splits.items():
        (image_root / split).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            colour = COLOURS[index % len(COLOURS)]
            filename = f"{index:05d}.jpg"
            Image.new("RGB", size, (40 * index % 256, 90, 200 - 20 * index % 200)).save(image_root / split / filename)
            sentences = [{"raw": f"A {colour} picture number {index}, caption {j}."} for j in range(captions_per_image)]
            entries.append({"filepath": split, "filename": filename, "split": split, "sentences": sentences})
            index += 1
    annotations = root / "dataset_tiny.json"
    annotations.write_text(json.dumps({"images": entries}))
    return annotations, image_root
