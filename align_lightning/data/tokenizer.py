"""Tokenizers: load any Hugging Face tokenizer, or learn a WordPiece vocabulary from alt-texts as ALIGN did.

Command line (``python -m align_lightning tokenizer --help``): learn the vocabulary from the
captions of img2dataset shards and save a tokenizer folder that recipes point to::

    python -m align_lightning tokenizer --shards '/data/cc3m/{00000..00331}.tar' --out tokenizers/cc3m
    # recipe: data.init_args.tokenizer: tokenizers/cc3m
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from align_lightning._errors import ConfigError
from align_lightning.data.shards import (
    ShardDamage,
    SkippedSample,
    check_record,
    decode_caption,
    expand_urls,
    iter_shard,
)

__all__ = [
    "CaptionStats",
    "iter_captions",
    "load_tokenizer",
    "main",
    "tokenizer_from_files",
    "tokenizer_to_files",
    "train_tokenizer_from_shards",
    "train_wordpiece",
]

logger = logging.getLogger(__name__)

_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

#: ALIGN's vocabulary size (WordPiece learned from its alt-texts); the tool's default.
ALIGN_VOCAB_SIZE = 100_000
#: Default bound on the distinct words counted in memory by :func:`train_tokenizer_from_shards`
#: (about 100 bytes each in a Python ``Counter``: ~0.4 GB at the bound).
DEFAULT_MAX_WORDS_IN_MEMORY = 4_000_000
#: Name of the provenance file written next to the tokenizer files.
TRAINING_INFO_FILE = "tokenizer_training.json"


def _prune_counts(counts: Counter[str], keep: int, dropped_characters: set[str]) -> None:
    """Drop the words of the lowest counts (all words of one count together) until at most ``keep`` remain.

    Treating equal counts alike keeps the result independent of word order and spelling; the
    characters of the dropped words are remembered so the alphabet stays exact.
    """
    histogram = Counter(counts.values())
    remaining, threshold = len(counts), 0
    for count in sorted(histogram):
        if remaining <= keep:
            break
        remaining -= histogram[count]
        threshold = count
    for word in [word for word, count in counts.items() if count <= threshold]:
        dropped_characters.update(word)
        del counts[word]


def train_wordpiece(
    texts: Iterable[str],
    vocab_size: int = 30522,
    min_frequency: int = 2,
    lowercase: bool = True,
    max_length: int = 64,
    save_dir: str | Path | None = None,
    max_words_in_memory: int | None = None,
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
        max_words_in_memory: Bound on the distinct words counted at once (``None``: no bound,
            exact counts). Web alt-texts hold an unbounded number of distinct strings (ids, file
            names, typos), so counting a large corpus exactly needs memory proportional to it
            (about 100 bytes per distinct word). With a bound, whenever the table grows past it,
            the words of the lowest counts are dropped (all words of one count together, so the
            result stays deterministic) until at most ``max_words_in_memory // 2`` remain. This is
            approximate for the rarest words only: a word is counted exactly as long as it is never
            dropped, which holds for the words that make it into the vocabulary when the bound is
            well above ``vocab_size`` (e.g. 4M for 100k); a word dropped and seen again later
            restarts from zero. The character alphabet stays exact.

    Returns:
        A fast tokenizer usable wherever a Hugging Face tokenizer is.

    Raises:
        ValueError: If ``vocab_size`` cannot even hold the special tokens and the characters seen.
    """
    normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase or None)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if max_words_in_memory is not None and max_words_in_memory < 2:
        raise ValueError(f"max_words_in_memory must be at least 2 or None, got {max_words_in_memory}.")
    counts: Counter[str] = Counter()
    dropped_characters: set[str] = set()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
        if max_words_in_memory is not None and len(counts) > max_words_in_memory:
            _prune_counts(counts, max_words_in_memory // 2, dropped_characters)
    characters = sorted({char for word in counts for char in word} | dropped_characters)
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


def tokenizer_to_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """The files of ``tokenizer.save_pretrained`` as ``{file name: text}``, to embed in a checkpoint.

    A checkpoint that carries its tokenizer is self-contained: ``validate`` / ``test`` / inference
    from it need no access to the training data the vocabulary was learned from.
    """
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        files = sorted(path for path in Path(folder).iterdir() if path.is_file())
        return {path.name: path.read_text(encoding="utf-8") for path in files}


def tokenizer_from_files(files: Mapping[str, str], max_length: int | None = None) -> PreTrainedTokenizerBase:
    """Rebuild a tokenizer from :func:`tokenizer_to_files`' mapping.

    Args:
        files: ``{file name: text}`` as written by ``save_pretrained``.
        max_length: Maximum tokens per caption; default: the saved ``model_max_length``.
    """
    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            (Path(folder) / Path(name).name).write_text(text, encoding="utf-8")
        tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True)
    if max_length is not None:
        tokenizer.model_max_length = max_length
    return tokenizer


@dataclass
class CaptionStats:
    """What :func:`iter_captions` read, filled in as it goes.

    Attributes:
        shards: Shards read to the end (or to their damage).
        records: Records found in them.
        captions: Captions delivered.
        skipped: Records (or shards) skipped, by reason (:data:`~align_lightning.data.shards.SKIP_REASONS`).
    """

    shards: int = 0
    records: int = 0
    captions: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def num_skipped(self) -> int:
        """Total of :attr:`skipped`."""
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (reasons sorted)."""
        data = asdict(self)
        data["skipped"] = dict(sorted(self.skipped.items()))
        return data


@dataclass
class _ShardCaptions:
    url: str
    captions: list[str]
    records: int
    skipped: Counter[str]


def _read_shard_captions(
    url: str, storage_options: Mapping[str, Any] | None, retries: int, backoff: float, stop: threading.Event
) -> _ShardCaptions:
    """All captions of one shard, skipping (and counting) what the training loader would skip."""
    result = _ShardCaptions(url, [], 0, Counter())
    records = iter_shard(url, storage_options, retries=retries, backoff=backoff)
    try:
        for item in records:
            if stop.is_set():
                break
            if isinstance(item, ShardDamage):
                result.skipped[item.reason] += 1
                logger.warning("Shard %s: %s after %d records (%s).", url, item.reason, result.records, item.message)
                continue
            result.records += 1
            checked = check_record(item)
            if isinstance(checked, SkippedSample):
                result.skipped[checked.reason] += 1
                continue
            try:
                result.captions.append(decode_caption(checked[2]))
            except UnicodeDecodeError:
                result.skipped["bad_caption"] += 1
    finally:
        records.close()
    return result


def iter_captions(
    urls: str | Sequence[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    max_samples: int | None = None,
    num_workers: int = 8,
    retries: int = 3,
    backoff: float = 1.0,
    stats: CaptionStats | None = None,
    progress: bool = False,
) -> Iterator[str]:
    """Stream the alt-texts (``.txt`` members) of img2dataset shards, in shard order.

    Records are checked as the training loader checks them (:func:`~align_lightning.data.shards.check_record`,
    strict UTF-8): a record without an image or caption, with an empty member or with a caption
    that is not UTF-8 is skipped and counted, and a damaged or unreachable shard contributes the
    records before the damage. Images are not decoded (far too slow for a vocabulary pass), so the
    captions of records whose image turns out corrupt are included. Never raises for bad data.

    Shards are read ahead by ``num_workers`` threads (reads from object stores are mostly waiting);
    captions are still delivered in shard order, so the result does not depend on ``num_workers``.

    Args:
        urls: Brace-notation shard URLs (``"s3://bucket/cc3m/{00000..00331}.tar"``; several joined
            with ``"::"``, or a list), any fsspec protocol.
        storage_options: Passed to fsspec (credentials, endpoint, ...).
        max_samples: Stop after this many captions (``None``: all).
        num_workers: Shards read concurrently (threads); ``1`` reads them one after the other.
        retries: Retries for opening a shard and for resuming a broken read.
        backoff: Seconds before the first retry; doubled after each.
        stats: If given, updated with what was read and skipped (counts cover the shards read,
            including the part of the last one after ``max_samples`` captions).
        progress: Show a progress bar over the shards.

    Yields:
        Captions, as decoded.

    Raises:
        ValueError: If ``urls`` expand to nothing.
    """
    shard_urls = expand_urls(urls)
    stats = stats if stats is not None else CaptionStats()
    stop = threading.Event()
    delivered = 0
    with tqdm(total=len(shard_urls), unit="shard", desc="captions", disable=not progress) as bar:
        shards = _read_ahead(
            shard_urls,
            lambda url: _read_shard_captions(url, storage_options, retries, backoff, stop),
            max(1, num_workers),
            stop,
        )
        try:
            for shard in shards:
                stats.shards += 1
                stats.records += shard.records
                stats.skipped.update(shard.skipped)
                for caption in shard.captions:
                    if max_samples is not None and delivered >= max_samples:
                        return
                    delivered += 1
                    stats.captions += 1
                    yield caption
                bar.update(1)
                bar.set_postfix(captions=stats.captions, skipped=stats.num_skipped, refresh=False)
                if max_samples is not None and delivered >= max_samples:
                    return
        finally:
            shards.close()


def _read_ahead(
    urls: Sequence[str], read: Callable[[str], _ShardCaptions], num_workers: int, stop: threading.Event
) -> Iterator[_ShardCaptions]:
    """``map(read, urls)`` with up to ``2 * num_workers`` shards read ahead by threads, in order."""
    if num_workers == 1:
        for url in urls:
            yield read(url)
        return
    pending: list[Future[_ShardCaptions]] = []
    remaining = iter(urls)
    with ThreadPoolExecutor(num_workers, thread_name_prefix="captions") as pool:
        try:
            for url in remaining:
                pending.append(pool.submit(read, url))
                if len(pending) >= 2 * num_workers:
                    break
            while pending:
                result = pending.pop(0).result()
                url = next(remaining, None)
                if url is not None:
                    pending.append(pool.submit(read, url))
                yield result
        finally:  # stopped early (max_samples) or failed: let the running reads end now
            stop.set()
            for future in pending:
                future.cancel()


def train_tokenizer_from_shards(
    urls: str | Sequence[str],
    vocab_size: int,
    out_dir: str | Path,
    *,
    lowercase: bool = True,
    min_frequency: int = 2,
    max_length: int = 64,
    max_samples: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    max_words_in_memory: int | None = DEFAULT_MAX_WORDS_IN_MEMORY,
    num_workers: int = 8,
    stats: CaptionStats | None = None,
) -> PreTrainedTokenizerFast:
    """Learn a WordPiece vocabulary from the alt-texts of img2dataset shards and save it as a tokenizer folder.

    This is what ALIGN did (a 100k WordPiece vocabulary learned from its own alt-texts). The
    captions are streamed (:func:`iter_captions`: bad records are skipped and counted, never fatal)
    into :func:`train_wordpiece`, which is deterministic: the same shards and arguments always give
    the same vocabulary and token ids. Point a recipe at the folder
    (``data.init_args.tokenizer: <out_dir>``; loaded by :func:`load_tokenizer`). Run it on the
    shards you train on, after filtering (``python -m align_lightning filter``), so that the
    vocabulary is not spent on the junk the filter removes.

    The folder holds the ``save_pretrained`` files and ``tokenizer_training.json`` (the arguments
    and the counts of captions read and records skipped).

    Args:
        urls: Brace-notation shard URLs (``"::"``-joined or a list), any fsspec protocol.
        vocab_size: Upper bound on the vocabulary size (special tokens and characters included);
            a small corpus may give fewer tokens (only words seen ``min_frequency`` times enter).
        out_dir: Folder to write (created; existing tokenizer files are overwritten).
        lowercase: Lower-case and strip accents (uncased BERT); ``False`` keeps case.
        min_frequency: Minimum count for a whole word to enter the vocabulary.
        max_length: ``model_max_length`` saved with the tokenizer (ALIGN: 64).
        max_samples: Learn from the first this many captions only (``None``: all).
        storage_options: Passed to fsspec.
        progress: Show a progress bar.
        max_words_in_memory: Bound on the distinct words counted at once (see
            :func:`train_wordpiece`; ``None`` counts exactly, with memory growing with the corpus).
        num_workers: Shards read concurrently (threads; the result does not depend on it).
        stats: If given, filled with the counts of shards, records, captions and skipped records.

    Returns:
        The tokenizer (also saved in ``out_dir``).

    Raises:
        ValueError: If the URLs expand to nothing, no caption could be read, or ``vocab_size`` is
            too small for the characters seen.
    """
    stats = stats if stats is not None else CaptionStats()
    captions = iter_captions(
        urls,
        storage_options=storage_options,
        max_samples=max_samples,
        num_workers=num_workers,
        stats=stats,
        progress=progress,
    )
    tokenizer = train_wordpiece(
        captions,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        lowercase=lowercase,
        max_length=max_length,
        max_words_in_memory=max_words_in_memory,
    )
    if stats.captions == 0:
        raise ValueError(
            f"No caption could be read from {urls!r} ({stats.shards} shards, {stats.records} records, "
            f"skipped: {dict(stats.skipped) or 'none'}): check the URLs and that the shards hold .txt members."
        )
    if stats.num_skipped:
        logger.warning("Skipped %d records or shards: %s", stats.num_skipped, dict(sorted(stats.skipped.items())))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    info = {
        "shards": list(urls) if not isinstance(urls, str) else urls,
        "vocab_size_requested": vocab_size,
        "vocab_size": len(tokenizer),
        "lowercase": lowercase,
        "min_frequency": min_frequency,
        "max_length": max_length,
        "max_samples": max_samples,
        "max_words_in_memory": max_words_in_memory,
        **stats.as_dict(),
    }
    (out / TRAINING_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    logger.info("Saved a %d-token WordPiece tokenizer to %s (%d captions).", len(tokenizer), out, stats.captions)
    return tokenizer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m align_lightning tokenizer",
        description=(
            "Learn a WordPiece vocabulary from the alt-texts (.txt members) of img2dataset webdataset\n"
            "shards, as ALIGN learned its 100k vocabulary from its own alt-texts, and save it as a\n"
            "Hugging Face tokenizer folder. The result is deterministic (same shards and options, same\n"
            "vocabulary and ids). Bad records (missing or empty members, captions that are not UTF-8)\n"
            "and damaged shards are skipped and counted, never fatal."
        ),
        epilog=(
            "examples:\n"
            "  python -m align_lightning tokenizer --shards '/data/cc3m/{00000..00331}.tar' --out tokenizers/cc3m\n"
            "  python -m align_lightning tokenizer --shards 's3://bucket/laion/{00000..41455}.tar' \\\n"
            "      --max-samples 20000000 --vocab-size 100000 --out tokenizers/laion-100k\n"
            "\n"
            "then, in a recipe:  data.init_args.tokenizer: tokenizers/cc3m\n"
            "(the text tower's vocab_size follows the tokenizer automatically)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--shards",
        action="append",
        required=True,
        metavar="URLS",
        help="shard URLs in brace notation, any fsspec protocol ('/data/{00000..00099}.tar', 's3://...'); "
        "repeat the option or join patterns with '::'",
    )
    parser.add_argument("--out", required=True, help="output folder (created; tokenizer files are overwritten)")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=ALIGN_VOCAB_SIZE,
        help="upper bound on the vocabulary size, special tokens and characters included "
        "(ALIGN: 100000; bert-base-uncased: 30522); a small corpus gives fewer tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--min-frequency",
        type=int,
        default=2,
        help="minimum count for a whole word to enter the vocabulary (default: %(default)s)",
    )
    parser.add_argument(
        "--cased", action="store_true", help="keep case and accents (default: lower-case like BERT uncased)"
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=64,
        help="maximum tokens per caption saved with the tokenizer (default: %(default)s)",
    )
    parser.add_argument(
        "--max-samples", type=int, default=None, help="learn from the first N captions only (default: all)"
    )
    parser.add_argument(
        "--max-words-in-memory",
        type=int,
        default=DEFAULT_MAX_WORDS_IN_MEMORY,
        help="bound on distinct words counted at once (~100 bytes each); past it the rarest are pruned, "
        "which is approximate for the rarest words only; 0 counts exactly with unbounded memory "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=8,
        help="shards read concurrently (threads; the result does not depend on it) (default: %(default)s)",
    )
    parser.add_argument(
        "--storage-options",
        type=json.loads,
        default=None,
        metavar="JSON",
        help='fsspec storage options as JSON, e.g. \'{"anon": true}\' or \'{"endpoint_url": "..."}\'',
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m align_lightning tokenizer``: learn a WordPiece tokenizer from shards (see ``--help``).

    Args:
        argv: The arguments after ``tokenizer`` (``None``: ``sys.argv[1:]``).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    patterns = [pattern for value in args.shards for pattern in value.split("::") if pattern.strip()]
    for name in ("vocab_size", "min_frequency", "max_length", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error(f"--max-samples must be positive, got {args.max_samples}")
    if args.max_words_in_memory < 0 or args.max_words_in_memory == 1:
        parser.error(f"--max-words-in-memory must be 0 (exact) or at least 2, got {args.max_words_in_memory}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stats = CaptionStats()
    try:
        tokenizer = train_tokenizer_from_shards(
            patterns,
            args.vocab_size,
            args.out,
            lowercase=not args.cased,
            min_frequency=args.min_frequency,
            max_length=args.max_length,
            max_samples=args.max_samples,
            storage_options=args.storage_options,
            progress=not args.no_progress,
            max_words_in_memory=args.max_words_in_memory or None,
            num_workers=args.workers,
            stats=stats,
        )
    except (ValueError, ImportError) as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(stats.skipped.items())) or "none"
    print(
        f"Saved a {len(tokenizer)}-token WordPiece tokenizer to {args.out} from {stats.captions} captions in "
        f"{stats.shards} shards (skipped: {skipped}). Use it with `tokenizer: {args.out}`."
    )
