"""Evaluation DataModules: Karpathy-JSON retrieval and ImageFolder zero-shot, and their rank sharding."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast

from align_lightning.data.demo_corpus import DemoCorpus, write_demo_corpus
from align_lightning.data.evaluation import (
    ContiguousShardSampler,
    RetrievalDataModule,
    ZeroShotDataModule,
    shard_range,
)
from align_lightning.data.tokenizer import train_wordpiece

Karpathy = tuple[Path, Path, list[dict[str, Any]]]

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> DemoCorpus:
    return write_demo_corpus(tmp_path_factory.mktemp("demo"), num_train=50, num_eval=40, noise=False, num_workers=0)


@pytest.fixture(scope="module")
def tokenizer(corpus: DemoCorpus) -> PreTrainedTokenizerFast:
    entries = json.loads(corpus.karpathy_json.read_text())["images"]
    return train_wordpiece([s["raw"] for e in entries for s in e["sentences"]], vocab_size=500, min_frequency=1)


@pytest.fixture
def tiny_karpathy(tmp_path: Path) -> Karpathy:
    """A hand-written Karpathy JSON without ``filepath``, 4 to 6 captions per image, images directly in the root."""
    root = tmp_path / "images"
    root.mkdir()
    entries = []
    for i, (split, n) in enumerate([("test", 4), ("train", 5), ("test", 6), ("test", 5), ("val", 4), ("test", 4)]):
        filename = f"img{i}.png"
        Image.new("RGB", (40 + 4 * i, 48), (30 * i, 10, 200)).save(root / filename)
        entries.append(
            {"filename": filename, "split": split, "sentences": [{"raw": f"image {i} caption {j}"} for j in range(n)]}
        )
    annotations = tmp_path / "dataset_tiny.json"
    annotations.write_text(json.dumps({"images": entries}))
    return annotations, root, entries


# ---------------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 11, 40])
def test_shard_range_covers_each_index_once(n: int, world: int) -> None:
    shares = [shard_range(n, rank, world) for rank in range(world)]
    assert [i for share in shares for i in share] == list(range(n))  # contiguous, in order, disjoint, complete
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1


def test_shard_range_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank"):
        shard_range(10, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        shard_range(10, 0, 0)


@pytest.mark.parametrize("world", [2, 3])
def test_sampler_shares_without_padding(world: int) -> None:
    data = list(range(11))
    got = [list(ContiguousShardSampler(data, num_replicas=world, rank=rank)) for rank in range(world)]
    assert sorted(i for share in got for i in share) == data
    assert all(len(ContiguousShardSampler(data, world, rank)) == len(got[rank]) for rank in range(world))


def test_loader_shards_by_torch_distributed_rank(monkeypatch: pytest.MonkeyPatch, tiny_karpathy: Karpathy) -> None:
    annotations, root, _ = tiny_karpathy
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 3)
    seen = []
    for rank in range(3):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, r=rank, **k: r)
        dm = RetrievalDataModule(annotations, root, image_size=IMAGE_SIZE, batch_size=2, num_workers=0)
        seen += [i for batch in dm.image_dataloader() for i in batch["index"].tolist()]
    assert seen == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------- retrieval


def test_retrieval_demo_corpus(corpus: DemoCorpus, tokenizer: PreTrainedTokenizerFast) -> None:
    dm = RetrievalDataModule(
        corpus.karpathy_json, corpus.image_root, split="test", name="demo", image_size=IMAGE_SIZE,
        tokenizer=tokenizer, batch_size=16, num_workers=0,
    )  # fmt: skip
    dm.setup("validate")
    entries = [e for e in json.loads(corpus.karpathy_json.read_text())["images"] if e["split"] == "test"]
    assert dm.images == [str(corpus.image_root / e["filepath"] / e["filename"]) for e in entries]
    assert dm.captions == [s["raw"] for e in entries for s in e["sentences"]]
    assert len(dm.images) == 40
    assert len(dm.captions) == 200
    assert dm.text_to_image.dtype == torch.long
    assert dm.text_to_image.tolist() == [i for i in range(40) for _ in range(5)]

    image_loader, text_loader = dm.image_dataloader(), dm.text_dataloader()
    indices = []
    for batch in image_loader:
        assert set(batch) == {"pixel_values", "index"}
        assert batch["pixel_values"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch["pixel_values"].min() >= -1.0
        assert batch["pixel_values"].max() <= 1.0
        indices += batch["index"].tolist()
    assert indices == list(range(40))
    text_indices = []
    for batch in text_loader:
        assert set(batch) == {"input_ids", "attention_mask", "index"}
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        text_indices += batch["index"].tolist()
    assert text_indices == list(range(200))
    first = next(iter(text_loader))
    length = int(first["attention_mask"][0].sum())
    assert first["input_ids"][0, :length].tolist() == tokenizer(dm.captions[0])["input_ids"]
    # The Trainer's loaders: one loader, the image batches then the caption batches, never mixed.
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        batches = list(loader)
        kinds = ["pixel_values" in b for b in batches]
        assert kinds == sorted(kinds, reverse=True)
        assert [i for b in batches if "pixel_values" in b for i in b["index"].tolist()] == list(range(40))
        assert [i for b in batches if "input_ids" in b for i in b["index"].tolist()] == list(range(200))
        assert all(set(b) in ({"pixel_values", "index"}, {"input_ids", "attention_mask", "index"}) for b in batches)


def test_retrieval_single_loader_shares_ranks_without_padding(
    corpus: DemoCorpus, tokenizer: PreTrainedTokenizerFast
) -> None:
    """Each of 3 ranks gets a disjoint contiguous share of images and of captions; together, each once."""
    dm = RetrievalDataModule(
        corpus.karpathy_json, corpus.image_root, image_size=IMAGE_SIZE, tokenizer=tokenizer, batch_size=7,
        num_workers=0,
    )  # fmt: skip
    images, captions = [], []
    for rank in range(3):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=3)  # type: ignore[assignment]
        for batch in dm.val_dataloader():
            (images if "pixel_values" in batch else captions).extend(batch["index"].tolist())
    assert images == list(range(40))
    assert captions == list(range(200))


def test_retrieval_split_selection_and_no_filepath(tiny_karpathy: Karpathy) -> None:
    annotations, root, entries = tiny_karpathy
    for split in ("test", "train", "val"):
        dm = RetrievalDataModule(annotations, root, split=split, image_size=IMAGE_SIZE, num_workers=0)
        chosen = [e for e in entries if e["split"] == split]
        assert dm.images == [str(root / e["filename"]) for e in chosen]
        assert dm.captions == [s["raw"] for e in chosen for s in e["sentences"]]
        expected = [i for i, e in enumerate(chosen) for _ in e["sentences"]]
        assert dm.text_to_image.tolist() == expected
        for j, caption in enumerate(dm.captions):  # "image {i} caption {k}": the caption names its image
            assert chosen[dm.text_to_image[j]]["filename"] == f"img{caption.split()[1]}.png"
    test = RetrievalDataModule(annotations, root, image_size=IMAGE_SIZE, batch_size=3, num_workers=0)
    assert len(test.images) == 4
    assert len(test.captions) == 4 + 6 + 5 + 4


def test_retrieval_empty_filepath_is_root(tmp_path: Path, tiny_karpathy: Karpathy) -> None:
    annotations, root, entries = tiny_karpathy
    for e in entries:
        e["filepath"] = ""
    annotations.write_text(json.dumps({"images": entries}))
    dm = RetrievalDataModule(annotations, root, image_size=IMAGE_SIZE, num_workers=0)
    assert dm.images[0] == str(root / "img0.png")


def test_retrieval_missing_annotations_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "dataset_flickr30k.json"
    dm = RetrievalDataModule(missing, tmp_path, num_workers=0)
    with pytest.raises(FileNotFoundError, match="nowhere/dataset_flickr30k.json"):
        dm.setup()


def test_retrieval_empty_split_lists_present_splits(tiny_karpathy: Karpathy) -> None:
    annotations, root, _ = tiny_karpathy
    dm = RetrievalDataModule(annotations, root, split="restval", num_workers=0)
    with pytest.raises(ValueError, match="restval") as err:
        dm.setup()
    assert "'test' (4 images)" in str(err.value)
    assert "'train' (1 images)" in str(err.value)
    assert "'val' (1 images)" in str(err.value)


def test_retrieval_missing_image_named(tiny_karpathy: Karpathy) -> None:
    annotations, root, _ = tiny_karpathy
    (root / "img2.png").unlink()
    dm = RetrievalDataModule(annotations, root, num_workers=0)
    with pytest.raises(FileNotFoundError, match="img2.png") as err:
        dm.setup()
    assert str(root) in str(err.value)
    assert "img0.png" not in str(err.value)


def test_retrieval_not_karpathy(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="Karpathy"):
        RetrievalDataModule(bad, tmp_path, num_workers=0).setup()


def test_retrieval_tokenizer_set_later(tiny_karpathy: Karpathy, tokenizer: PreTrainedTokenizerFast) -> None:
    annotations, root, _ = tiny_karpathy
    dm = RetrievalDataModule(annotations, root, image_size=IMAGE_SIZE, num_workers=0)
    with pytest.raises(RuntimeError, match="set_tokenizer"):
        dm.text_dataloader()
    with pytest.raises(RuntimeError, match="set_tokenizer"):
        dm.val_dataloader()
    dm.set_tokenizer(tokenizer)
    batch = next(iter(dm.text_dataloader()))
    assert batch["index"].tolist() == list(range(min(19, dm.batch_size)))


def test_retrieval_tokenizer_from_folder(
    tmp_path: Path, tiny_karpathy: Karpathy, tokenizer: PreTrainedTokenizerFast
) -> None:
    annotations, root, _ = tiny_karpathy
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    dm = RetrievalDataModule(annotations, root, tokenizer=str(tmp_path / "tok"), max_length=8, num_workers=0)
    assert dm.tokenizer is not None
    assert dm.tokenizer.model_max_length == 8
    assert next(iter(dm.text_dataloader()))["input_ids"].shape[1] <= 8


# ---------------------------------------------------------------------------------------------- zero-shot


def test_zeroshot_demo_corpus(corpus: DemoCorpus) -> None:
    dm = ZeroShotDataModule(
        corpus.zeroshot_root, templates=corpus.templates_file, name="demo", image_size=IMAGE_SIZE,
        batch_size=16, num_workers=0,
    )  # fmt: skip
    dm.setup("validate")
    class_dirs = sorted(p.name for p in corpus.zeroshot_root.iterdir())
    assert dm.class_dirs == class_dirs
    assert dm.classnames == corpus.classnames_file.read_text().split("\n")[:-1]  # default: ../classnames.txt
    assert dm.templates == list(corpus.templates)
    assert len(dm.images) == len(dm.targets) > 0
    for path, target in zip(dm.images, dm.targets.tolist(), strict=True):
        assert Path(path).parent.name == class_dirs[target]
    indices, targets = [], []
    for batch in dm.val_dataloader():
        assert set(batch) == {"pixel_values", "target", "index"}
        assert batch["pixel_values"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        indices += batch["index"].tolist()
        targets += batch["target"].tolist()
    assert indices == list(range(len(dm.images)))
    assert targets == dm.targets.tolist()


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    root = tmp_path / "val"
    for name, count in (("sea_lion", 2), ("ant", 3), ("zebra", 1)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (36, 36), (i * 50, 0, 0)).save(root / name / f"{i}.jpg")
    (root / "ant" / "notes.txt").write_text("not an image")
    return root


def test_zeroshot_classnames_from_folders(tiny_folder: Path) -> None:
    dm = ZeroShotDataModule(tiny_folder, templates=["a photo of a {}."], image_size=IMAGE_SIZE, num_workers=0)
    assert dm.classnames == ["ant", "sea lion", "zebra"]
    assert dm.targets.tolist() == [0, 0, 0, 1, 1, 2]
    assert [Path(p).name for p in dm.images] == ["0.jpg", "1.jpg", "2.jpg", "0.jpg", "1.jpg", "0.jpg"]


def test_zeroshot_classnames_file_and_list(tiny_folder: Path) -> None:
    names = tiny_folder.parent / "names.txt"
    names.write_text("formica\nCalifornia sea lion\n\nplains zebra\n")
    dm = ZeroShotDataModule(tiny_folder, classnames=names, templates=["{}"], num_workers=0)
    assert dm.classnames == ["formica", "California sea lion", "plains zebra"]
    (tiny_folder.parent / "classnames.txt").write_text("a\nb\nc\n")  # the default file beside root
    assert ZeroShotDataModule(tiny_folder, templates=["{}"], num_workers=0).classnames == ["a", "b", "c"]
    listed = ZeroShotDataModule(tiny_folder, classnames=["x", "y", "z"], templates=["{}"], num_workers=0)
    assert listed.classnames == ["x", "y", "z"]


def test_zeroshot_classnames_count_mismatch(tiny_folder: Path) -> None:
    dm = ZeroShotDataModule(tiny_folder, classnames=["one", "two"], templates=["{}"], num_workers=0)
    with pytest.raises(ValueError, match="2 class names .* 3 class folders"):
        dm.setup()
    dm = ZeroShotDataModule(tiny_folder, classnames=tiny_folder / "missing.txt", templates=["{}"], num_workers=0)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        dm.setup()


def test_zeroshot_templates(tmp_path: Path, tiny_folder: Path) -> None:
    with pytest.raises(ValueError, match="lack it"):
        ZeroShotDataModule(tiny_folder, templates=["a photo of a {}.", "no placeholder"], num_workers=0)
    with pytest.raises(ValueError, match="no templates"):
        ZeroShotDataModule(tiny_folder, templates=[], num_workers=0)
    with pytest.raises(ValueError, match="not 'imagenet'"):
        ZeroShotDataModule(tiny_folder, templates=str(tmp_path / "nope.txt"), num_workers=0)
    file = tmp_path / "templates.txt"
    file.write_text("a photo of a {}.\n\nitap of a {}.\n")
    assert ZeroShotDataModule(tiny_folder, templates=file, num_workers=0).templates == [
        "a photo of a {}.",
        "itap of a {}.",
    ]
    file.write_text("a photo of a {}.\nbroken\n")
    with pytest.raises(ValueError, match="broken"):
        ZeroShotDataModule(tiny_folder, templates=file, num_workers=0)


def test_zeroshot_missing_root_and_empty_classes(tmp_path: Path, tiny_folder: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent"):
        ZeroShotDataModule(tmp_path / "absent", templates=["{}"], num_workers=0).setup()
    empty_root = tmp_path / "empty"
    empty_root.mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ZeroShotDataModule(empty_root, templates=["{}"], num_workers=0).setup()
    (tiny_folder / "yak").mkdir()
    (tiny_folder / "yak" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="yak"):
        ZeroShotDataModule(tiny_folder, templates=["{}"], num_workers=0).setup()
