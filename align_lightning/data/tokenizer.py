"""Tokenizers: load any Hugging Face tokenizer, or learn a WordPiece vocabulary from alt-texts as ALIGN did."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from align_lightning._errors import ConfigError

__all__ = ["load_tokenizer", "train_wordpiece"]

_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(
    texts: Iterable[str],
    vocab_size: int = 30522,
    min_frequency: int = 2,
    lowercase: bool = True,
    max_length: int = 64,
    save_dir: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """Learn a BERT-style WordPiece vocabulary from captions (ALIGN learned 100k from its alt-texts).

    The vocabulary holds every character seen (as a word start and as a ``##`` continuation), so
    any text can be tokenised, plus the most frequent words (at least ``min_frequency``
    occurrences, ties broken alphabetically) up to ``vocab_size``; rarer words are split into
    pieces by WordPiece's greedy longest match. The result is **deterministic**: the same captions
    always give the same vocabulary and ids (the ``tokenizers`` trainer numbers tokens in hash-map
    order, which changes from run to run and would silently scramble a text tower's embeddings
    when a run is resumed with a re-learned vocabulary).

    The tokenizer behaves like ``bert-base-uncased``'s: BERT normalisation and pre-tokenisation,
    ``[CLS] text [SEP]`` framing, ``[PAD]`` id 0.

    Args:
        texts: Training captions (iterated once).
        vocab_size: Upper bound on the vocabulary size (special tokens and characters included).
        min_frequency: Minimum count for a whole word to enter the vocabulary.
        lowercase: Lower-case and strip accents (as the uncased BERT vocabulary).
        max_length: ``model_max_length`` of the returned tokenizer (ALIGN: 64 tokens).
        save_dir: If given, ``save_pretrained`` the tokenizer there (reload with
            :func:`load_tokenizer` or ``AutoTokenizer.from_pretrained``).

    Returns:
        A fast tokenizer usable wherever a Hugging Face tokenizer is.

    Raises:
        ValueError: If ``vocab_size`` cannot even hold the special tokens and the characters seen.
    """
    normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase or None)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    characters = sorted({char for word in counts for char in word})
    base = _SPECIAL_TOKENS + characters + [f"##{char}" for char in characters]
    if vocab_size < len(base):
        raise ValueError(
            f"vocab_size={vocab_size} cannot hold the {len(_SPECIAL_TOKENS)} special tokens and the "
            f"{len(characters)} characters seen (x2 for ## pieces); use at least {len(base)}."
        )
    frequent = sorted(
        (w for w, c in counts.items() if c >= min_frequency and len(w) > 1), key=lambda w: (-counts[w], w)
    )
    vocab = base + sorted(frequent[: vocab_size - len(base)])
    tokenizer = Tokenizer(models.WordPiece(vocab={token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def load_tokenizer(name_or_path: str, max_length: int = 64) -> PreTrainedTokenizerBase:
    """Load a Hugging Face tokenizer by hub name or from a local folder.

    Args:
        name_or_path: Hub name (``"bert-base-uncased"``, needs a network or a warm cache) or a
            folder written by ``save_pretrained`` (e.g. by :func:`train_wordpiece`).
        max_length: Maximum number of tokens per caption (ALIGN: 64).

    Raises:
        ConfigError: If the tokenizer cannot be found, naming the path and the alternatives.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
    except (OSError, ValueError) as err:
        raise ConfigError(
            "tokenizer",
            name_or_path,
            "cannot load this tokenizer: no such local folder, and not a Hugging Face hub name available here "
            "(offline or unknown). Point it at a folder written by save_pretrained / train_wordpiece, or leave it "
            "unset where the DataModule learns its own WordPiece vocabulary.",
        ) from err
    tokenizer.model_max_length = max_length
    return tokenizer
