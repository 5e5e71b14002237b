"""Tests for align_lightning/data/tokenizer.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from align_lightning._errors import ConfigError
from align_lightning.data import load_tokenizer, train_wordpiece

CAPTIONS = ["a red circle on a light background", "Blue Squares at the top", "a small green triangle"] * 20


def test_train_wordpiece_behaves_like_bert_uncased(tmp_path: Path) -> None:
    tokenizer = train_wordpiece(CAPTIONS, vocab_size=200, save_dir=tmp_path)
    encoded = tokenizer("A RED Circle")
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens == ["[CLS]", "a", "red", "circle", "[SEP]"]
    assert tokenizer.pad_token_id == 0
    assert len(tokenizer) <= 200
    assert tokenizer.model_max_length == 64
    # Unseen words fall back to word pieces / [UNK], never an error.
    assert "[UNK]" in tokenizer.convert_ids_to_tokens(tokenizer("zebra 🦓")["input_ids"])
    # Saved as a standard tokenizer folder, loadable by name.
    reloaded = load_tokenizer(str(tmp_path), max_length=32)
    assert reloaded("a red circle")["input_ids"] == tokenizer("a red circle")["input_ids"]
    assert reloaded.model_max_length == 32


def test_train_wordpiece_is_deterministic() -> None:
    first = train_wordpiece(CAPTIONS, vocab_size=200)
    second = train_wordpiece(CAPTIONS, vocab_size=200)
    assert first.get_vocab() == second.get_vocab()


def test_load_tokenizer_missing_path_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"tokenizer='/no/such/tokenizer'.*save_pretrained"):
        load_tokenizer("/no/such/tokenizer")


# --- python -m align_lightning tokenizer: learning the vocabulary from img2dataset shards ---

ANIMALS = ("zebra", "giraffe", "penguin", "walrus", "flamingo")
PLACES = ("beach", "savanna", "glacier", "harbour")


def _shard_caption(index: int) -> str:
    return f"a {ANIMALS[index % 5]} on the {PLACES[index % 4]} at dusk"


def _write_caption_shards(pattern: str, storage_options: dict | None = None) -> list[str]:
    """Two shards of 30 good records each, plus four bad ones in the second shard."""
    from align_lightning.data.shards import ShardWriter

    with ShardWriter(pattern, max_samples=32, storage_options=storage_options) as writer:
        for i in range(60):
            writer.write(f"{i:09d}", {"jpg": b"\xff\xd8 not decoded here", "txt": _shard_caption(i).encode()})
            if i == 40:  # bad records, in the second shard
                writer.write("000000900", {"jpg": b"\xff\xd8", "txt": b"caf\xe9 latin-1 \xff"})  # not UTF-8
                writer.write("000000901", {"jpg": b"\xff\xd8", "json": b"{}"})  # no .txt
                writer.write("000000902", {"jpg": b"", "txt": b"zero-byte image"})
                writer.write("000000903", {"txt": b"no image at all"})
    return writer.urls


def _run_tool(*args: str) -> None:
    from align_lightning.cli import main

    main(["tokenizer", "--no-progress", *args])


def test_tokenizer_tool_learns_from_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    urls = _write_caption_shards(str(tmp_path / "shards" / "{:05d}.tar"))
    assert len(urls) == 2
    pattern = str(tmp_path / "shards" / "{00000..00001}.tar")
    out = tmp_path / "tok"
    _run_tool("--shards", pattern, "--out", str(out), "--vocab-size", "120", "--max-length", "32")
    summary = capsys.readouterr().out
    assert "from 60 captions in 2 shards" in summary
    assert f"tokenizer: {out}" in summary

    tokenizer = load_tokenizer(str(out), max_length=32)
    assert len(tokenizer) <= 120
    # Frequent caption words are single tokens (lower-cased by default).
    for word in (*ANIMALS, *PLACES, "dusk"):
        assert tokenizer.tokenize(word.upper()) == [word]
    # The bad records' words were never counted: "latin", "zero", "image" are not whole words.
    vocab = tokenizer.get_vocab()
    assert not {"latin", "zero", "image"} & set(vocab)

    info = json.loads((out / "tokenizer_training.json").read_text())
    assert info["captions"] == 60
    assert info["records"] == 64
    assert info["skipped"] == {"bad_caption": 1, "empty_file": 1, "missing_caption": 1, "missing_image": 1}
    assert info["vocab_size"] == len(tokenizer)


def test_tokenizer_tool_is_deterministic_and_independent_of_workers(tmp_path: Path) -> None:
    _write_caption_shards(str(tmp_path / "shards" / "{:05d}.tar"))
    pattern = str(tmp_path / "shards" / "{00000..00001}.tar")
    runs = [("--workers", "4"), ("--workers", "4"), ("--workers", "1")]
    for i, extra in enumerate(runs):
        _run_tool("--shards", pattern, "--out", str(tmp_path / f"tok{i}"), "--vocab-size", "120", *extra)
    files = [(tmp_path / f"tok{i}" / "tokenizer.json").read_bytes() for i in range(len(runs))]
    assert files[0] == files[1] == files[2]


def test_tokenizer_tool_options(tmp_path: Path) -> None:
    _write_caption_shards(str(tmp_path / "shards" / "{:05d}.tar"))
    # Repeated --shards and "::" joins; --cased keeps case; --max-samples stops early.
    first, second = (str(tmp_path / "shards" / f"0000{i}.tar") for i in range(2))
    _run_tool("--shards", first, "--shards", second, "--out", str(tmp_path / "a"), "--cased")
    cased = load_tokenizer(str(tmp_path / "a"))
    assert cased.tokenize("zebra") == ["zebra"]
    assert cased.tokenize("Zebra") != ["zebra"]
    _run_tool(
        "--shards", f"{first}::{second}", "--out", str(tmp_path / "b"), "--max-samples", "5", "--min-frequency", "1"
    )
    limited = load_tokenizer(str(tmp_path / "b"))
    words = {_shard_caption(i).split()[1] for i in range(5)}
    assert words <= set(limited.get_vocab())
    assert "tokenizer_training.json" in {p.name for p in (tmp_path / "b").iterdir()}


def test_tokenizer_tool_reads_memory_urls(tmp_path: Path) -> None:
    import uuid

    import fsspec

    base = f"memory://tokenizer-test-{uuid.uuid4().hex}"
    try:
        _write_caption_shards(base + "/{:05d}.tar")
        _run_tool("--shards", base + "/{00000..00001}.tar", "--out", str(tmp_path / "tok"), "--vocab-size", "120")
        assert load_tokenizer(str(tmp_path / "tok")).tokenize("walrus") == ["walrus"]
    finally:
        fsspec.filesystem("memory").rm(base, recursive=True)


def test_damaged_and_missing_shards_are_counted_not_fatal(tmp_path: Path) -> None:
    from align_lightning.data.tokenizer import CaptionStats, iter_captions

    urls = _write_caption_shards(str(tmp_path / "{:05d}.tar"))
    data = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(data[: len(data) // 2])  # cut mid-record
    stats = CaptionStats()
    captions = list(
        iter_captions([*urls, str(tmp_path / "missing.tar")], stats=stats, retries=0, backoff=0.0, num_workers=2)
    )
    assert captions[:32] == [_shard_caption(i) for i in range(32)]
    assert 32 < len(captions) < 60
    assert stats.captions == len(captions)
    assert stats.shards == 3
    assert stats.skipped["truncated_shard"] == 1
    assert stats.skipped["unreadable_shard"] == 1


def test_tokenizer_tool_without_captions_exits_with_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from align_lightning.data.shards import ShardWriter

    with ShardWriter(str(tmp_path / "empty.tar"), max_samples=None) as writer:
        writer.write("000000000", {"jpg": b"\xff\xd8"})
    with pytest.raises(SystemExit) as exit_info:
        _run_tool("--shards", str(tmp_path / "empty.tar"), "--out", str(tmp_path / "tok"))
    assert exit_info.value.code == 1
    assert "No caption could be read" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()


def test_bounded_word_counting_keeps_the_frequent_vocabulary() -> None:
    # 2,000 distinct one-off words (web junk) around frequent caption words.
    texts = [f"{_shard_caption(i)} junk{i:05d}x" for i in range(2000)]
    exact = train_wordpiece(texts, vocab_size=300)
    bounded = train_wordpiece(texts, vocab_size=300, max_words_in_memory=100)
    assert bounded.get_vocab() == exact.get_vocab()  # the one-off words never reach min_frequency anyway
    assert train_wordpiece(texts, vocab_size=300, max_words_in_memory=100).get_vocab() == bounded.get_vocab()
    with pytest.raises(ValueError, match="max_words_in_memory"):
        train_wordpiece(texts, max_words_in_memory=1)
