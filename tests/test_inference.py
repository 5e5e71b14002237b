"""Tests for the inference commands (align_lightning/inference.py, commands.py, embeddings.py) and
callbacks.EmbeddingWriter: ``embed``, ``classify``, ``search`` and ``predict``, on generated data."""

from __future__ import annotations

import csv
import importlib.util
import logging
import re
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from align_lightning.cli import main, run
from align_lightning.data.shards import ShardWriter
from align_lightning.data.transforms import image_transform
from align_lightning.embeddings import Embeddings, check_embeddings_path, top_k
from align_lightning.eval.zeroshot import zeroshot_classifier
from align_lightning.module import ALIGNModule
from tests.inference_utils import caption, gather_on_two_ranks, noise_image, tiny_checkpoint, write_retrieval_set

IMAGE_SIZE = 32  # the tiny checkpoint's training resolution


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def module(checkpoint: Path) -> ALIGNModule:
    return ALIGNModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five images (nested, .jpg and .png), a corrupt .jpg and a file that is not an image."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub" / "deeper").mkdir(parents=True)
    for i, name in enumerate(["b.jpg", "a.png", "sub/c.jpg", "sub/deeper/d.png", "sub/e.JPG"]):
        noise_image(i).save(root / name, format="PNG" if name.endswith("png") else "JPEG", quality=95)
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def _direct_image_embeds(module: ALIGNModule, paths: list[Path]) -> torch.Tensor:
    transform = image_transform(IMAGE_SIZE, train=False, normalize="align")
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return module.model.encode_image(pixels)


def _direct_text_embeds(module: ALIGNModule, texts: list[str]) -> torch.Tensor:
    tokens = module.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        return module.model.encode_text(tokens["input_ids"], tokens["attention_mask"])


# ------------------------------------------------------------------------------------------ embed


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_embed_writes_keys_and_the_models_embeddings(
    checkpoint: Path,
    module: ALIGNModule,
    photos: Path,
    tmp_path: Path,
    suffix: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\n\n  a blue square  \na green triangle\n")
    out = tmp_path / f"emb{suffix}"
    with caplog.at_level(logging.WARNING):
        main(
            ["embed", "--ckpt", str(checkpoint), "--images", str(photos), "--texts", str(texts), "--out", str(out)]
            + ["--batch-size", "2", "--num-workers", "0", "--no-progress"]
        )
    embeddings = Embeddings.load(out)
    assert embeddings.image_keys == ["a.png", "b.jpg", "sub/c.jpg", "sub/deeper/d.png", "sub/e.JPG"]
    assert embeddings.text_keys == ["1", "3", "4"]  # 1-based line numbers, blank line skipped
    expected = _direct_image_embeds(module, [photos / key for key in embeddings.image_keys])
    torch.testing.assert_close(torch.from_numpy(np.asarray(embeddings.image_embeds)), expected, atol=1e-5, rtol=1e-5)
    expected = _direct_text_embeds(module, ["a red circle", "a blue square", "a green triangle"])
    torch.testing.assert_close(torch.from_numpy(np.asarray(embeddings.text_embeds)), expected, atol=1e-5, rtol=1e-5)
    # The corrupt image is skipped, counted and logged; the metadata records what produced the embeddings.
    assert embeddings.metadata["skipped"] == {"corrupt_image": 1}
    assert "sub/broken.jpg" in caplog.text
    assert embeddings.metadata["checkpoint"] == str(checkpoint.resolve())
    assert embeddings.metadata["image_size"] == IMAGE_SIZE
    assert "Wrote 5 image and 3 text embeddings (64-d)" in capsys.readouterr().out


def test_embed_reads_webdataset_shards_by_sample_key(checkpoint: Path, module: ALIGNModule, tmp_path: Path) -> None:
    from align_lightning.inference import embed, load_checkpoint

    images = [noise_image(10 + i) for i in range(5)]
    with ShardWriter(str(tmp_path / "shards" / "{:05d}.tar"), max_samples=3) as writer:
        for i, image in enumerate(images):
            path = tmp_path / f"{i}.jpg"
            image.save(path, quality=95)
            writer.write(f"s{i:03d}", {"jpg": path.read_bytes(), "txt": caption(i).encode()})
        writer.write("s999", {"jpg": b"garbage", "txt": b"a broken record"})
    model = load_checkpoint(checkpoint, device="cpu")
    embeddings = embed(model, str(tmp_path / "shards" / "{00000..00001}.tar"), batch_size=2, num_workers=2)
    # Two workers read one shard each: keys identify the rows whatever the interleaving.
    assert sorted(embeddings.image_keys) == [f"s{i:03d}" for i in range(5)]
    assert embeddings.metadata["skipped"] == {"corrupt_image": 1}
    rows = [embeddings.image_keys.index(f"s{i:03d}") for i in range(5)]
    expected = _direct_image_embeds(module, [tmp_path / f"{i}.jpg" for i in range(5)])
    torch.testing.assert_close(torch.from_numpy(embeddings.image_embeds[rows]), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ckpt", "{tmp}/missing.ckpt", "--images", "{photos}", "--out", "{tmp}/e.npy"], "Checkpoint .* not found"),
        (["--ckpt", "{ckpt}", "--images", "{tmp}/empty", "--out", "{tmp}/e.npy"], "No images .* under"),
        (["--ckpt", "{ckpt}", "--images", "{photos}", "--out", "{tmp}/e.pt"], "unknown suffix '.pt'"),
        (["--ckpt", "{ckpt}", "--images", "{tmp}/none/*.tar", "--out", "{tmp}/e.npy"], "neither a folder"),
        (["--ckpt", "{ckpt}", "--texts", "{tmp}/no.txt", "--out", "{tmp}/e.npy"], "Texts file .* not found"),
    ],
    ids=["missing-checkpoint", "empty-folder", "bad-suffix", "missing-shards", "missing-texts"],
)
def test_embed_reports_bad_input_clearly(
    checkpoint: Path,
    photos: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    values = {"tmp": str(tmp_path), "photos": str(photos), "ckpt": str(checkpoint)}
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", *(arg.format(**values) for arg in args), "--no-progress"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "embed: error:" in err
    assert re.search(message, err), err


def test_embed_needs_something_to_embed(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["embed", "--ckpt", str(checkpoint), "--out", str(tmp_path / "e.npy")])
    assert "give --images, --texts or both" in capsys.readouterr().err


def test_checkpoint_without_model_configuration_is_refused(tmp_path: Path, dual_encoder: torch.nn.Module) -> None:
    from align_lightning.inference import load_checkpoint

    path = tmp_path / "python_built.ckpt"
    torch.save({"state_dict": dual_encoder.state_dict(), "hyper_parameters": {"retrieval_ks": [1]}}, path)
    with pytest.raises(ValueError, match="does not record its model's configuration"):
        load_checkpoint(path, device="cpu")


# ------------------------------------------------------------------------------------ file formats


def _embeddings(images: int, texts: int, dim: int = 6) -> Embeddings:
    generator = torch.Generator().manual_seed(images * 10 + texts)
    return Embeddings.from_rows(
        torch.randn(images, dim, generator=generator) if images else None,
        [f"img/{i}.jpg" for i in range(images)],
        torch.randn(texts, dim, generator=generator) if texts else None,
        [str(i + 1) for i in range(texts)],
        {"checkpoint": "/x.ckpt", "skipped": {"corrupt_image": 2}},
    )


@pytest.mark.parametrize("suffix", [".npy", ".safetensors", ".parquet"])
@pytest.mark.parametrize(("images", "texts"), [(4, 3), (4, 0), (0, 3)], ids=["both", "images", "texts"])
def test_embedding_files_round_trip(tmp_path: Path, suffix: str, images: int, texts: int) -> None:
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    original = _embeddings(images, texts)
    loaded = Embeddings.load(original.save(tmp_path / f"e{suffix}"))
    assert (loaded.image_keys, loaded.text_keys, loaded.metadata) == (
        original.image_keys,
        original.text_keys,
        original.metadata,
    )
    np.testing.assert_array_equal(loaded.image_embeds, original.image_embeds)
    np.testing.assert_array_equal(loaded.text_embeds, original.text_embeds)
    assert loaded.dim == 6


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    with pytest.raises(ImportError, match="pip install pyarrow"):
        check_embeddings_path(tmp_path / "e.parquet")


def test_a_foreign_file_is_not_read_as_embeddings(tmp_path: Path) -> None:
    np.save(tmp_path / "plain.npy", np.zeros((2, 3)))
    with pytest.raises(FileNotFoundError, match="sidecar"):
        Embeddings.load(tmp_path / "plain.npy")
    (tmp_path / "plain.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not written by align_lightning"):
        Embeddings.load(tmp_path / "plain.npy")


# ------------------------------------------------------------------------------------------ classify


def test_classify_prints_and_writes_probabilities_of_the_learned_temperature(
    checkpoint: Path, module: ALIGNModule, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    classnames = ["red circle", "blue square", "green triangle"]
    (tmp_path / "classes.txt").write_text("\n".join(classnames) + "\n")
    templates = ["a photo of a {}.", "a drawing of a {}."]
    out = tmp_path / "predictions.csv"
    main(
        ["classify", "--ckpt", str(checkpoint), "--images", str(photos), "--classnames", str(tmp_path / "classes.txt")]
        + ["--templates", templates[0], "--templates", templates[1], "--csv", str(out), "--top-k", "2"]
        + ["--num-workers", "0", "--no-progress"]
    )
    with open(out, newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["image", "prediction", *classnames]
    keys = [row[0] for row in rows[1:]]
    assert keys == ["a.png", "b.jpg", "sub/c.jpg", "sub/deeper/d.png", "sub/e.JPG"]
    probs = torch.tensor([[float(p) for p in row[2:]] for row in rows[1:]], dtype=torch.float64)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(len(keys), dtype=torch.float64), atol=1e-6, rtol=0)
    with torch.no_grad():
        weights = zeroshot_classifier(module.model, classnames, templates, module.tokenizer)
        logits = module.model.logit_scale() * _direct_image_embeds(module, [photos / k for k in keys]) @ weights
    expected = logits.softmax(dim=1).double()
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
    assert [row[1] for row in rows[1:]] == [classnames[i] for i in expected.argmax(dim=1).tolist()]
    table = capsys.readouterr().out
    top = expected.topk(2, dim=1)
    for key, p, c in zip(keys, top.values.tolist(), top.indices.tolist(), strict=True):
        line = next(line for line in table.splitlines() if key in line)
        assert f"{classnames[c[0]]} {p[0]:.1%}" in line
        assert f"{classnames[c[1]]} {p[1]:.1%}" in line


def test_classify_takes_comma_separated_classes(
    checkpoint: Path, photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(
        ["classify", "--ckpt", str(checkpoint), "--images", str(photos / "b.jpg"), "--classes", "red, blue"]
        + ["--top-k", "9", "--num-workers", "0", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert "1 images, 2 classes, 80 templates" in out  # CLIP's 80 ImageNet templates by default
    assert "top-2" in out
    assert "top-3" not in out  # --top-k is capped at the number of classes


# ------------------------------------------------------------------------------------------ search


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_top_k_equals_brute_force_ranking(chunk_size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    index = torch.nn.functional.normalize(torch.randn(50, 8, generator=generator), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(3, 8, generator=generator), dim=-1)
    index[17] = index[3]  # an exact tie: the lower row comes first
    scores, rows = top_k(queries, index.numpy(), 10, chunk_size=chunk_size)
    full = queries @ index.T
    expected = torch.from_numpy(np.argsort(-full.numpy(), axis=1, kind="stable")[:, :10])
    assert torch.equal(rows, expected)
    torch.testing.assert_close(scores, full.gather(1, expected))
    assert top_k(queries, index[:4].numpy(), 10)[1].shape == (3, 4)  # k is capped at the index size


def test_search_returns_the_brute_force_top_k(
    checkpoint: Path, module: ALIGNModule, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = tmp_path / "photos.npy"
    main(["embed", "--ckpt", str(checkpoint), "--images", str(photos), "--out", str(index)] + ["--num-workers", "0"])
    capsys.readouterr()
    queries = ["a red circle", "a blue square"]
    # No --ckpt: the checkpoint recorded in the embeddings file encodes the queries.
    main(["search", "--index", str(index), "--query", queries[0], "--query", queries[1], "-k", "3"])
    out = capsys.readouterr().out
    embeddings = Embeddings.load(index)
    scores = _direct_text_embeds(module, queries) @ torch.from_numpy(embeddings.image_embeds).T
    for query, row in zip(queries, scores, strict=True):
        section = out.split(f"Query {query!r}: top 3 of 5 images", 1)[1].split("Query", 1)[0]
        shown = [line.split("│")[2].strip() for line in section.splitlines() if line.count("│") == 4]
        assert shown == [embeddings.image_keys[i] for i in row.argsort(descending=True)[:3].tolist()]


def test_search_without_a_usable_checkpoint_says_to_pass_ckpt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _embeddings(4, 0).save(tmp_path / "moved.safetensors")  # records /x.ckpt, which does not exist
    with pytest.raises(SystemExit):
        main(["search", "--index", str(path), "--query", "a dog"])
    assert "pass --ckpt" in capsys.readouterr().err


def test_faiss_backend_is_optional_and_agrees_with_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(1)
    index = torch.randn(30, 4, generator=generator).numpy()
    queries = torch.randn(2, 4, generator=generator)
    monkeypatch.setitem(sys.modules, "faiss", None)  # not installed
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        top_k(queries, index, 5, backend="faiss")

    class FlatIP:  # faiss.IndexFlatIP's interface, computed with NumPy
        def __init__(self, dim: int) -> None:
            self.rows = np.zeros((0, dim), np.float32)

        def add(self, rows: np.ndarray) -> None:
            self.rows = np.concatenate([self.rows, rows])

        def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            scores = queries @ self.rows.T
            ids = np.argsort(-scores, axis=1)[:, :k]
            return np.take_along_axis(scores, ids, axis=1), ids

    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(IndexFlatIP=FlatIP))
    faiss_scores, faiss_rows = top_k(queries, index, 5, backend="faiss")
    exact_scores, exact_rows = top_k(queries, index, 5)
    assert torch.equal(faiss_rows, exact_rows)
    torch.testing.assert_close(faiss_scores, exact_scores)


# ------------------------------------------------------------------------------------------ predict


def test_predict_writes_the_models_embeddings(checkpoint: Path, module: ALIGNModule, tmp_path: Path) -> None:
    karpathy, _ = write_retrieval_set(tmp_path / "set", num_images=5, captions_per_image=2)
    out = tmp_path / "predicted.safetensors"
    run(
        ["predict", "--config", "recipes/eval_flickr30k.yaml", f"--ckpt_path={checkpoint}"]
        + [f"--data.init_args.annotations={karpathy}", f"--data.init_args.image_root={tmp_path / 'set'}"]
        + [f"--data.init_args.image_size={IMAGE_SIZE}", "--data.init_args.batch_size=2"]
        + ["--data.init_args.num_workers=0", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
        + [f"--trainer.default_root_dir={tmp_path}"]  # where LightningCLI saves config.yaml
        + ["--trainer.callbacks+=align_lightning.callbacks.EmbeddingWriter", f"--trainer.callbacks.output={out}"]
    )
    embeddings = Embeddings.load(out)
    assert embeddings.image_keys == [f"images/img_{i:03d}.jpg" for i in range(5)]
    assert embeddings.text_keys == [str(j) for j in range(10)]  # caption indices, in order
    expected = _direct_image_embeds(module, [tmp_path / "set" / key for key in embeddings.image_keys])
    torch.testing.assert_close(torch.from_numpy(embeddings.image_embeds), expected, atol=1e-5, rtol=1e-5)
    expected = _direct_text_embeds(module, [caption(j) for j in range(10)])
    torch.testing.assert_close(torch.from_numpy(embeddings.text_embeds), expected, atol=1e-5, rtol=1e-5)
    assert embeddings.metadata["checkpoint"] == str(checkpoint.resolve())


def test_embedding_writer_keeps_sample_keys_of_webdataset_batches(tmp_path: Path) -> None:
    """WebDataModule's predict batches carry the pairs' sample keys: both modalities' rows are keyed by them."""
    from types import SimpleNamespace

    from align_lightning.callbacks import EmbeddingWriter

    trainer = SimpleNamespace(
        global_rank=0,
        world_size=1,
        is_global_zero=True,
        datamodule=None,
        ckpt_path=None,
        strategy=SimpleNamespace(barrier=lambda name=None: None),
    )
    writer = EmbeddingWriter(tmp_path / "pairs.safetensors")
    writer.on_predict_epoch_start(trainer, None)
    for batch_idx, keys in enumerate([["000000007", "000000003"], ["000000005"]]):
        rows = torch.randn(len(keys), 4)
        prediction = {"image_embeds": rows, "text_embeds": -rows}
        writer.write_on_batch_end(trainer, None, prediction, None, {"keys": keys}, batch_idx, 0)
    writer.on_predict_epoch_end(trainer, None)
    embeddings = Embeddings.load(tmp_path / "pairs.safetensors")
    assert embeddings.image_keys == embeddings.text_keys == ["000000007", "000000003", "000000005"]
    np.testing.assert_array_equal(embeddings.text_embeds, -embeddings.image_embeds)
    with pytest.raises(TypeError, match="image_embeds and/or text_embeds"):
        writer.write_on_batch_end(trainer, None, torch.zeros(2), None, {}, 0, 0)
    with pytest.raises(ValueError, match="unknown suffix"):
        EmbeddingWriter(tmp_path / "pairs.pt")


def test_embeddings_of_every_rank_are_gathered_on_rank_zero_in_order(tmp_path: Path) -> None:
    """What EmbeddingWriter does at the end of predict under DDP, on two gloo processes."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(gather_on_two_ranks, args=(port, str(tmp_path)), nprocs=2)
    gathered = np.load(tmp_path / "gathered.npz")
    np.testing.assert_array_equal(gathered["rows"][:, 0], np.arange(7, dtype=np.float32))
    assert gathered["keys"].tolist() == [f"k{i}" for i in range(7)]
    assert gathered["one_keys"].tolist() == ["b", "a"]  # sorted by their order keys
    assert gathered["one_rows"].shape == (2, 3)
