"""Write small img2dataset-format shards for tests."""

from __future__ import annotations

import io
import json

from PIL import Image

from align_lightning.data.shards import ShardWriter


def jpeg_bytes(index: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A small JPEG whose colour encodes ``index``."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (index * 37 % 256, index * 11 % 256, 90)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def sample_files(index: int, size: tuple[int, int] = (48, 40)) -> dict[str, bytes]:
    """The members of a valid sample: JPEG, caption and img2dataset-style metadata."""
    caption = f"a photo of thing number {index % 13} in colour {index % 5}"
    meta = {"key": f"{index:09d}", "caption": caption, "width": size[0], "height": size[1], "status": "success"}
    return {"jpg": jpeg_bytes(index, size), "txt": caption.encode(), "json": json.dumps(meta).encode()}


def write_shards(pattern: str, num_samples: int, per_shard: int, size: tuple[int, int] = (48, 40)) -> list[str]:
    """Write ``num_samples`` valid samples (keys ``000000000``, ...) into shards of ``per_shard``."""
    with ShardWriter(pattern, max_samples=per_shard) as writer:
        for i in range(num_samples):
            writer.write(f"{i:09d}", sample_files(i, size))
    return writer.urls
