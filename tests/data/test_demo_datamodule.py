"""DemoDataModule: the demo corpus through shards, ALIGN's filter and WebDataModule."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from align_lightning.data import DemoDataModule
from align_lightning.data.demo import SHAPES
from align_lightning.data.shards import iter_shard


def test_demo_data_takes_the_real_data_path(tmp_path: Path) -> None:
    dm = DemoDataModule(num_train=300, num_val=20, image_size=32, batch_size=16, root=str(tmp_path))
    report = dm.filter_report
    assert report is not None
    # The filter removed the web noise the corpus planted (each kind breaks exactly one rule).
    dropped = report["totals"]["dropped"]
    assert dropped["image_size"] == 6
    assert dropped["aspect_ratio"] == 6
    assert dropped["text_shared"] >= 12
    assert dropped["unigram_count"] >= 12
    assert report["totals"]["input"] == report["totals"]["kept"] + sum(dropped.values()) + sum(
        report["totals"]["skipped"].values()
    )
    # Training reads the filtered shards: full batches of kept samples, each at most once per epoch
    # (drop_last: each worker's last partial batch is left out).
    filtered = {r.key for url in dm.train_urls for r in iter_shard(url) if hasattr(r, "key")}
    batches = [batch["keys"] for batch in dm.train_dataloader()]
    seen = Counter(k for keys in batches for k in keys)
    assert set(seen.values()) == {1}
    assert set(seen) <= filtered
    assert {len(keys) for keys in batches} == {16}
    assert len(filtered) - len(seen) < 16
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (16, 3, 32, 32)
    assert -1 <= batch["pixel_values"].min() <= batch["pixel_values"].max() <= 1
    assert all(shape in dm.tokenizer.get_vocab() for shape in SHAPES)  # learned from the filtered alt-texts
    # Held-out splits: clean captions, in order, one per image.
    assert sum(len(b["keys"]) for b in dm.val_dataloader()) == 20
    assert sum(len(b["keys"]) for b in dm.test_dataloader()) == 20
    # Cached: a second instance reuses the corpus and the filtered shards.
    mtime = Path(dm.train_urls[0]).stat().st_mtime_ns
    again = DemoDataModule(num_train=300, num_val=20, image_size=32, batch_size=16, root=str(tmp_path))
    assert again.train_urls == dm.train_urls
    assert Path(dm.train_urls[0]).stat().st_mtime_ns == mtime
