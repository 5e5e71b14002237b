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
