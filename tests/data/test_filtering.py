"""Tests for align_lightning/data/filtering.py: ALIGN's filtering rules over webdataset shards.

The main corpus is crafted so that each rule drops a known set of samples (and the boundary cases
of each threshold are kept); the rare-token vocabulary is checked against an independent Counter.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from PIL import Image, ImageDraw

from align_lightning.data import filtering
from align_lightning.data.filtering import (
    RULES,
    FilterConfig,
    _auto_buckets,
    _vocab_cut,
    filter_shards,
    hamming_distances,
    normalize_text,
    scaled_vocab_size,
    unigrams,
)
from align_lightning.data.shards import SKIP_REASONS, RawRecord, ShardWriter, iter_shard

# --------------------------------------------------------------------------------------------------
# Corpus builders


def _jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A small, distinct JPEG: a solid colour with a seeded noise patch (distinct bytes per seed)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
    image.paste(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), (4, 4))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3))).save(buffer, "PNG")
    return buffer.getvalue()


def _structured(seed: int, width: int = 400, height: int = 300) -> Image.Image:
    """A photo-like image (gradient and ellipses) whose perceptual hash is stable under re-encoding."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    gray = (x * rng.uniform(0.2, 1.0) + y * rng.uniform(0.0, 1.0)) % 256
    image = Image.fromarray(np.stack([gray] * 3, axis=-1).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(20, 150)), y0 + int(rng.integers(20, 150))]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def _encode(image: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


ADJECTIVES = ["red", "green", "blue", "small", "large", "old"]
NOUNS = ["dog", "car", "house", "tree", "boat"]
PLACES = ["in the park", "on the beach", "at night", "near a lake"]


@dataclass
class Corpus:
    """Samples (in shard order) and the rule (or skip reason) each is expected to meet; None = kept."""

    shards: list[list[tuple[str, dict[str, bytes]]]] = field(default_factory=lambda: [[], [], []])
    expected: dict[str, str | None] = field(default_factory=dict)
    captions: int = 0
    images: int = 0

    def caption(self) -> str:
        """A distinct caption made of common words only (every word occurs many times in the corpus)."""
        i = self.captions
        self.captions += 1
        return f"a {ADJECTIVES[i % 6]} {NOUNS[(i // 6) % 5]} {PLACES[(i // 30) % 4]}"

    def image(self, width: int = 256, height: int = 240) -> bytes:
        self.images += 1
        return _jpeg(width, height, seed=self.images)

    def add(self, key: str, files: dict[str, bytes], expected: str | None, shard: int | None = None) -> None:
        shard = len(self.expected) % 2 if shard is None else shard  # shards 0 and 1; shard 2 is special
        self.shards[shard].append((key, files))
        self.expected[key] = expected

    def sample(self, key: str, expected: str | None, text: str | None = None, image: bytes | None = None) -> None:
        files = {
            "jpg": image if image is not None else self.image(),
            "txt": (text if text is not None else self.caption()).encode(),
            "json": json.dumps({"key": key, "width": 9999, "height": 9999}).encode(),  # lies: must not be used
        }
        self.add(key, files, expected)

    def well_formed_texts(self) -> list[str]:
        """Captions of every sample the tool should count in its corpus statistics."""
        return [
            files["txt"].decode()
            for shard in self.shards
            for key, files in shard
            if self.expected[key] not in SKIP_REASONS
        ]

    def counts(self) -> tuple[Counter[str], Counter[str]]:
        dropped = Counter(v for v in self.expected.values() if v in RULES)
        skipped = Counter(v for v in self.expected.values() if v in SKIP_REASONS)
        return dropped, skipped

    def kept(self) -> set[str]:
        return {key for key, value in self.expected.items() if value is None}


def _reference_tokens(text: str) -> list[str]:
    return re.findall(r"\w+", " ".join(text.lower().split()))


def _reference_vocab_size(texts: list[str]) -> int:
    """Number of unigrams+bigrams occurring at least twice: with V = that, every n-gram seen once is out
    (no tie at the cut), so the rare-token rule drops exactly the texts with a once-seen unigram."""
    counts: Counter[str] = Counter()
    for text in texts:
        tokens = _reference_tokens(text)
        counts.update(tokens)
        counts.update(f"{a} {b}" for a, b in zip(tokens, tokens[1:], strict=False))
    return sum(1 for c in counts.values() if c >= 2)


def _build_corpus() -> Corpus:
    c = Corpus()
    # Kept, including the boundary of each threshold.
    for i in range(12):
        c.sample(f"keep{i:02d}", None)
    c.sample("keep_side201", None, image=c.image(201, 300))  # shorter side 201 > 200
    c.sample("keep_ratio2995", None, image=c.image(659, 220))  # 2.995 < 3
    for i in range(2):
        c.add(f"keep_png{i}", {"png": _png(300, 250, 1000 + i), "txt": c.caption().encode()}, None)
    shared_image = c.image()
    for i in range(5):  # an image with exactly 5 distinct texts (limit 5 in the test config): kept
        c.sample(f"keep_img5_{i}", None, image=shared_image)
    for i in range(10):  # a text shared by exactly 10 images (limit 10): kept; same after normalisation
        c.sample(f"keep_txt10_{i}", None, text=["The old boat near a lake", "the  OLD boat near a lake "][i % 2])
    c.sample("keep_3uni", None, text="a red-dog!")  # a, red, dog
    c.sample("keep_20uni", None, text=" ".join((["a", "red", "dog", "in", "the", "park"] * 4)[:20]))
    # Rule 1: image_size.
    c.sample("size200", "image_size", image=c.image(200, 300))
    c.sample("size120", "image_size", image=c.image(120, 260))
    # Rule 2: aspect_ratio.
    c.sample("ratio3", "aspect_ratio", image=c.image(660, 220))
    c.sample("ratio_tall", "aspect_ratio", image=c.image(220, 700))
    # Rule 3: image_alt_texts: one image with 6 distinct texts (limit 5).
    popular = c.image()
    for i in range(6):
        c.sample(f"img6_{i}", "image_alt_texts", image=popular)
    # Rule 4: text_shared: 11 distinct images, one normalised text (limit 10).
    for i in range(11):
        c.sample(
            f"txt11_{i:02d}", "text_shared", text=["The blue car on the beach", "the blue car  ON THE BEACH"][i % 2]
        )
    # Rule 5: unigram_count.
    c.sample("uni2", "unigram_count", text="red dog")
    c.sample("uni21", "unigram_count", text=" ".join((["a", "red", "dog", "in", "the", "park"] * 4)[:21]))
    c.sample("uni0", "unigram_count", text="  ...  ")
    # Rule 6: rare_token: each has one unigram that occurs once in the whole corpus.
    c.sample("rare1", "rare_token", text="a red dog xylophonic")
    c.sample("rare2", "rare_token", text="a blue car zqwv in the park")
    c.sample("rare3", "rare_token", text="a green tree 12345")
    # Unusable records.
    c.sample("garbage", "corrupt_image", image=b"this is not an image at all")
    c.add("badutf8", {"jpg": c.image(), "txt": b"a red \xff\xfe dog"}, "bad_caption")
    c.add("notxt", {"jpg": c.image(), "json": b"{}"}, "missing_caption")
    c.add("noimg", {"txt": c.caption().encode(), "json": b"{}"}, "missing_image")
    c.add("zerobyte", {"jpg": b"", "txt": c.caption().encode()}, "empty_file")
    # Shard 2: two kept samples, then a record cut by the truncation.
    c.add("s2_keep0", {"jpg": c.image(), "txt": c.caption().encode()}, None, shard=2)
    c.add("s2_keep1", {"jpg": c.image(), "txt": c.caption().encode()}, None, shard=2)
    c.add("s2_cut", {"jpg": c.image(), "txt": b"a lost caption " * 50}, "truncated_shard", shard=2)
    return c


def _write_corpus(c: Corpus, folder: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    urls = []
    for i, samples in enumerate(c.shards):
        url = f"{folder}/{i:05d}.tar"
        with ShardWriter(url, max_samples=None, storage_options=storage_options) as writer:
            writer.write_all(samples)
        urls.append(url)
    return urls


def _truncate_last_member(path: Path) -> None:
    """Cut the shard in the middle of its last member's data."""
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    os.truncate(path, last.offset_data + last.size // 2)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return _build_corpus()


@pytest.fixture(scope="module")
def shards(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    folder = tmp_path_factory.mktemp("input")
    urls = _write_corpus(corpus, str(folder))
    _truncate_last_member(Path(urls[2]))
    return str(folder / "{00000..00002}.tar"), urls


@pytest.fixture(scope="module")
def vocab_size(corpus: Corpus) -> int:
    return _reference_vocab_size(corpus.well_formed_texts())


@pytest.fixture(scope="module")
def config(vocab_size: int) -> FilterConfig:
    return FilterConfig(max_texts_per_image=5, vocab_size=vocab_size)


def _read_output(folder: str | Path, storage_options: dict[str, Any] | None = None) -> dict[str, RawRecord]:
    fs, path = fsspec.core.url_to_fs(str(folder), **(storage_options or {}))
    records: dict[str, RawRecord] = {}
    for name in sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar")):
        url = fs.unstrip_protocol(name) if "memory" in fs.protocol else name
        for item in iter_shard(url, storage_options):
            assert isinstance(item, RawRecord), item
            records[item.key] = item
    return records


def _without_run(report: dict[str, Any]) -> dict[str, Any]:
    """The report without what differs between equivalent runs: timing, and the output location."""
    same = {k: v for k, v in report.items() if k not in ("run", "output")}
    same["shards"] = [{k: v for k, v in row.items() if k != "output"} for row in report["shards"]]
    return same


# --------------------------------------------------------------------------------------------------
# Definitions


def test_text_normalisation_and_unigrams() -> None:
    assert normalize_text("  The  Dog\tON\nthe beach ") == "the dog on the beach"
    assert unigrams(normalize_text("Don't stop! Café-au-lait, 2 x_y")) == [
        "don",
        "t",
        "stop",
        "café",
        "au",
        "lait",
        "2",
        "x_y",
    ]


def test_defaults_are_the_papers() -> None:
    config = FilterConfig()
    assert (config.min_image_side, config.max_aspect_ratio) == (200, 3.0)
    assert (config.max_texts_per_image, config.max_images_per_text) == (1000, 10)
    assert (config.min_unigrams, config.max_unigrams) == (3, 20)
    assert scaled_vocab_size(1_800_000_000, config) == 100_000_000  # the paper's V for its corpus
    assert scaled_vocab_size(3_300_000, config) == 183_333  # CC-3M: same ratio
    assert scaled_vocab_size(1000, config) == config.min_vocab_size == 100_000  # the floor
    assert scaled_vocab_size(1000, FilterConfig(vocab_size=7)) == 7


@pytest.mark.parametrize(
    "bad",
    [
        {"max_aspect_ratio": 1.0},
        {"min_unigrams": 5, "max_unigrams": 4},
        {"num_buckets": 3},
        {"num_buckets": 8192},
        {"vocab_size": 0},
    ],
)
def test_config_rejects_bad_thresholds(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="FilterConfig|min_unigrams"):
        FilterConfig(**bad)


def test_vocab_cut_takes_ties_up_to_v() -> None:
    histogram = {5: 2, 3: 4, 1: 10}  # count -> number of n-grams with that count
    assert _vocab_cut(histogram, 2) == (5, 2)
    assert _vocab_cut(histogram, 4) == (3, 2)  # both 5s, and 2 of the four 3s (in hash order)
    assert _vocab_cut(histogram, 6) == (3, 4)
    assert _vocab_cut(histogram, 15) == (1, 9)
    assert _vocab_cut(histogram, 16) == (0, 0)  # V covers every n-gram: keep all
    assert _vocab_cut(histogram, 10**8) == (0, 0)


def test_automatic_bucket_count_bounds_memory() -> None:
    assert _auto_buckets(0) == 1
    assert _auto_buckets(256 * 2**20) == 1
    assert _auto_buckets(256 * 2**20 + 1) == 2
    assert _auto_buckets(100 * 2**30) == 512  # 100 GiB of spill: 200 MiB per bucket
    assert _auto_buckets(10 * 2**40) == 4096  # the cap


def test_hamming_distances() -> None:
    hashes = np.array([0, 0xFF, 2**64 - 1], dtype=np.uint64)
    assert hamming_distances(hashes, 0).tolist() == [0, 8, 64]


# --------------------------------------------------------------------------------------------------
# The crafted corpus


def test_each_rule_drops_exactly_its_samples(
    corpus: Corpus, shards: tuple[str, list[str]], config: FilterConfig, vocab_size: int, tmp_path: Path
) -> None:
    pattern, urls = shards
    report = filter_shards(pattern, str(tmp_path / "out"), config=config, progress=False)

    dropped, skipped = corpus.counts()
    totals = report["totals"]
    assert totals["dropped"] == {rule: dropped.get(rule, 0) for rule in RULES}
    assert totals["skipped"] == {reason: skipped.get(reason, 0) for reason in SKIP_REASONS}
    assert totals["kept"] == len(corpus.kept())
    assert totals["input"] == len(corpus.expected)  # the truncated record counts once
    assert totals["input"] == totals["kept"] + sum(totals["dropped"].values()) + sum(totals["skipped"].values())
    assert dropped == {
        "image_size": 2,
        "aspect_ratio": 2,
        "image_alt_texts": 6,
        "text_shared": 11,
        "unigram_count": 3,
        "rare_token": 3,
    }

    stats = report["statistics"]
    well_formed = len(corpus.well_formed_texts())
    assert stats["pairs"] == well_formed
    assert (stats["vocab_size"], stats["vocab_size_source"], stats["vocab_count_threshold"]) == (
        vocab_size,
        "config",
        2,
    )
    assert (stats["texts_over_limit"], stats["images_over_limit"]) == (1, 1)
    assert stats["num_buckets"] == 1  # automatic: a tiny spill fits one bucket
    assert report["config"]["max_texts_per_image"] == 5
    assert report["rule_order"] == list(RULES)
    assert [row["shard"] for row in report["shards"]] == urls
    assert sum(row["kept"] for row in report["shards"]) == totals["kept"]
    assert report["shards"][2]["skipped"]["truncated_shard"] == 1
    assert report["incomplete_shards"] == []
    assert json.loads((tmp_path / "out" / "filter_report.json").read_text()) == report

    # One output shard per input shard, same basenames; kept samples whole and byte-identical.
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    output = _read_output(tmp_path / "out")
    assert set(output) == corpus.kept()
    inputs = {key: files for samples in corpus.shards for key, files in samples}
    for key, record in output.items():
        assert list(record.files.items()) == [(ext, data) for ext, data in inputs[key].items()]


def test_thresholds_are_configurable(
    corpus: Corpus, shards: tuple[str, list[str]], config: FilterConfig, tmp_path: Path
) -> None:
    pattern, _ = shards
    out = str(tmp_path / "out")
    base = filter_shards(pattern, out, config=config, progress=False)["totals"]
    looser = FilterConfig(
        max_texts_per_image=6, vocab_size=config.vocab_size, min_image_side=100, max_images_per_text=11, max_unigrams=21
    )
    report = filter_shards(pattern, out, config=looser, progress=False)  # same output: parts must not be reused
    totals = report["totals"]
    assert report["run"]["shards_resumed"] == 0
    assert totals["dropped"]["image_size"] == 0
    assert totals["dropped"]["image_alt_texts"] == 0
    assert totals["dropped"]["text_shared"] == 0
    assert totals["dropped"]["unigram_count"] == 2  # the 0- and 2-unigram texts; 21 unigrams are allowed now
    assert totals["kept"] == base["kept"] + 2 + 6 + 11 + 1
    assert {"size200", "size120", "img6_0", "txt11_00", "uni21"} <= set(_read_output(out))
    stricter = FilterConfig(max_texts_per_image=5, vocab_size=config.vocab_size, max_aspect_ratio=2.9)
    totals = filter_shards(pattern, out, config=stricter, progress=False)["totals"]
    assert totals["dropped"]["aspect_ratio"] == base["dropped"]["aspect_ratio"] + 1  # 659x220 (2.995) now dropped


def test_vocab_size_scales_with_the_corpus(corpus: Corpus, shards: tuple[str, list[str]], tmp_path: Path) -> None:
    pattern, _ = shards
    pairs = len(corpus.well_formed_texts())
    scaled = FilterConfig(max_texts_per_image=5, vocab_per_pair=0.25, min_vocab_size=1)
    stats = filter_shards(pattern, str(tmp_path / "a"), config=scaled, progress=False)["statistics"]
    assert (stats["vocab_size"], stats["vocab_size_source"]) == (round(pairs * 0.25), "scaled")
    assert not stats["vocab_complete"]
    floor = FilterConfig(max_texts_per_image=5)  # tiny corpus: the floor keeps every n-gram
    report = filter_shards(pattern, str(tmp_path / "b"), config=floor, progress=False)
    assert report["statistics"]["vocab_size"] == 100_000
    assert report["statistics"]["vocab_complete"]
    assert report["totals"]["dropped"]["rare_token"] == 0


def test_bucket_count_does_not_change_results(shards: tuple[str, list[str]], vocab_size: int, tmp_path: Path) -> None:
    """A V that cuts through a tie: the tie quota is taken in global hash order across buckets."""
    pattern, _ = shards
    reports = [
        filter_shards(
            pattern,
            str(tmp_path / str(buckets)),
            config=FilterConfig(max_texts_per_image=5, vocab_size=vocab_size + 9, num_buckets=buckets),
            progress=False,
        )
        for buckets in (1, 16)
    ]
    for report in reports:
        del report["config"]["num_buckets"], report["statistics"]["num_buckets"]
    assert reports[0]["statistics"]["vocab_count_threshold"] == 1
    assert _without_run(reports[0]) == _without_run(reports[1])


def _tagged_hash(ngram: str, bigram: bool) -> int:
    value = int.from_bytes(hashlib.blake2b(ngram.encode(), digest_size=8).digest(), "little")
    return value | 1 if bigram else value & ~1


def test_vocab_ties_are_broken_by_hash_across_buckets(tmp_path: Path) -> None:
    """'the <w> dog' for 10 words: 'the' and 'dog' are frequent, the rest tie at count 1. V = 2 + 12
    takes 12 of the 30 tied n-grams, the lowest tagged hashes (the documented order), whatever the bucket."""
    words = ["apple", "brick", "cloud", "delta", "ember", "flint", "grape", "hazel", "iris", "jade"]
    c = Corpus(shards=[[]])
    for word in words:
        c.add(word, {"jpg": c.image(), "txt": f"the {word} dog".encode()}, None, shard=0)
    url = _write_corpus(c, str(tmp_path / "in"))[0]
    ties = [(_tagged_hash(w, False), w) for w in words]
    ties += [(_tagged_hash(f"the {w}", True), None) for w in words]
    ties += [(_tagged_hash(f"{w} dog", True), None) for w in words]
    chosen = {w for _, w in sorted(ties)[:12] if w is not None}
    assert 0 < len(chosen) < len(words)  # the cut goes through the unigrams: the test can fail
    for buckets in (1, 4, 4096):  # 4096: every fine bucket of the spill files is its own reduce bucket
        config = FilterConfig(vocab_size=14, num_buckets=buckets)
        report = filter_shards(url, str(tmp_path / f"out{buckets}"), config=config, progress=False)
        assert report["statistics"]["vocab_count_threshold"] == 1
        assert set(_read_output(tmp_path / f"out{buckets}")) == chosen
        assert report["totals"]["dropped"]["rare_token"] == len(words) - len(chosen)


def test_parallel_matches_serial(shards: tuple[str, list[str]], config: FilterConfig, tmp_path: Path) -> None:
    pattern, _ = shards
    serial = filter_shards(pattern, str(tmp_path / "w1"), config=config, workers=1, progress=False)
    parallel = filter_shards(pattern, str(tmp_path / "w2"), config=config, workers=2, progress=False)
    assert _without_run(serial) == _without_run(parallel)
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


def test_resume_recomputes_only_missing_shards(
    shards: tuple[str, list[str]], config: FilterConfig, tmp_path: Path
) -> None:
    pattern, _ = shards
    out = tmp_path / "out"
    first = filter_shards(pattern, str(out), config=config, progress=False)
    assert (first["run"]["pass1"], first["run"]["shards_filtered"]) == ("computed", 3)
    parts = out / "_filter" / "parts"
    (out / "00001.tar").unlink()
    (parts / "00001.tar.json").unlink()
    (parts / "00000.tar.json").unlink()  # a shard written by a run killed before its part: not done
    untouched = (out / "00002.tar").stat().st_mtime_ns
    second = filter_shards(pattern, str(out), config=config, progress=False)
    assert second["run"]["pass1"] == "reused"  # the statistics saved by the first run
    assert (second["run"]["shards_filtered"], second["run"]["shards_resumed"]) == (2, 1)
    assert (out / "00002.tar").stat().st_mtime_ns == untouched
    assert _without_run(second) == _without_run(first)


def test_a_run_killed_mid_shard_leaves_no_half_shard(
    shards: tuple[str, list[str]], config: FilterConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pattern, _ = shards
    out = tmp_path / "out"
    original = ShardWriter.write
    written = []

    def failing_write(self: ShardWriter, key: str, files: dict[str, bytes]) -> None:
        written.append(key)
        if len(written) == 5:
            raise KeyboardInterrupt  # killed while the first shard is being written
        original(self, key, files)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        filter_shards(pattern, str(out), config=config, progress=False)
    assert not (out / "00000.tar").exists()
    assert not (out / "00000.tar.incomplete").exists()
    assert not (out / "_filter" / "parts" / "00000.tar.json").exists()
    monkeypatch.setattr(ShardWriter, "write", original)
    report = filter_shards(pattern, str(out), config=config, progress=False)
    assert (report["run"]["pass1"], report["run"]["shards_filtered"]) == ("reused", 3)
    assert report["totals"]["kept"] == len(_read_output(out))


def test_unreadable_shard_is_counted_and_retried(
    corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(filtering, "_READ_BACKOFF", 0.0)
    good = _write_corpus(Corpus(shards=[corpus.shards[0]], expected=corpus.expected), str(tmp_path / "in"))[0]
    missing = str(tmp_path / "in" / "00009.tar")
    out = str(tmp_path / "out")
    report = filter_shards([good, missing], out, config=FilterConfig(max_texts_per_image=5), progress=False)
    assert report["incomplete_shards"] == [missing]
    assert report["totals"]["skipped"]["unreadable_shard"] == 1
    assert report["shards"][0]["kept"] > 0
    assert not Path(out, "00009.tar").exists()
    Path(missing).write_bytes(Path(good).read_bytes())  # the storage comes back
    report = filter_shards([good, missing], out, config=FilterConfig(max_texts_per_image=5), progress=False)
    assert report["incomplete_shards"] == []
    assert report["run"]["pass1"] == "computed"  # statistics with a shard missing were not saved
    assert report["shards"][1]["kept"] == report["shards"][0]["kept"]


def test_memory_filesystem_end_to_end() -> None:
    root = f"memory://filter-{uuid.uuid4().hex}"
    c = Corpus(shards=[[], []])
    for i in range(4):
        c.sample(f"k{i}", None)
    c.sample("small", "image_size", image=c.image(100, 300))
    c.sample("wide", "aspect_ratio", image=c.image(900, 250))
    c.sample("short", "unigram_count", text="a dog")
    c.sample("garbage", "corrupt_image", image=b"\x00" * 100)
    _write_corpus(c, f"{root}/in")
    try:
        report = filter_shards(f"{root}/in/{{00000..00001}}.tar", f"{root}/out", progress=False)  # paper defaults
        dropped, skipped = c.counts()
        assert report["totals"]["dropped"] == {rule: dropped.get(rule, 0) for rule in RULES}
        assert report["totals"]["skipped"]["corrupt_image"] == 1
        assert report["statistics"]["vocab_size"] == 100_000
        assert set(_read_output(f"{root}/out")) == c.kept()
        fs = fsspec.filesystem("memory")
        assert json.loads(fs.cat_file(f"{root}/out/filter_report.json"))["totals"] == report["totals"]
        with pytest.raises(ValueError, match="memory://"):
            filter_shards(f"{root}/in/00000.tar", f"{root}/out2", workers=2, progress=False)
    finally:
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


def test_exclude_removes_near_duplicates_of_eval_images(tmp_path: Path) -> None:
    evaluation = tmp_path / "eval"
    (evaluation / "flickr").mkdir(parents=True)
    (evaluation / "nested" / "deeper").mkdir(parents=True)
    original = _structured(1)
    (evaluation / "flickr" / "a.jpg").write_bytes(_encode(original))
    (evaluation / "nested" / "deeper" / "b.png").write_bytes(_encode(_structured(2), "PNG"))
    (evaluation / "c.JPG").write_bytes(_encode(_structured(3)))
    (evaluation / "notes.txt").write_text("not an image")

    copy = _encode(original.resize((320, 240), Image.Resampling.BICUBIC), quality=70)  # re-encoded, resized
    broken = _encode(_structured(5))
    c = Corpus(shards=[[]])
    c.add("dup", {"jpg": copy, "txt": b"a red dog in the park"}, "eval_near_duplicate", shard=0)
    c.add("other", {"jpg": _encode(_structured(4)), "txt": b"a blue car on the beach"}, None, shard=0)
    c.add("broken", {"jpg": broken[: len(broken) // 3], "txt": b"a green tree at night"}, "corrupt_image", shard=0)
    url = _write_corpus(c, str(tmp_path / "in"))[0]

    report = filter_shards(url, str(tmp_path / "out"), exclude=[str(evaluation)], progress=False)
    assert report["exclude"]["images"] == 3
    assert report["totals"]["dropped"]["eval_near_duplicate"] == 1
    assert report["totals"]["skipped"]["corrupt_image"] == 1  # pixels are decoded only with --exclude
    (removed,) = report["removed_near_duplicates"]
    assert (removed["shard"], removed["key"], removed["eval_file"]) == (
        url,
        "dup",
        str(evaluation / "flickr" / "a.jpg"),
    )
    assert removed["distance"] <= FilterConfig().exclude_max_distance
    assert set(_read_output(tmp_path / "out")) == {"other"}

    without = filter_shards(url, str(tmp_path / "out2"), progress=False)  # header-only checks keep both
    assert without["totals"]["kept"] == 3
    with pytest.raises(ValueError, match="No images"):
        filter_shards(url, str(tmp_path / "out3"), exclude=[str(tmp_path / "in")], progress=False)


# --------------------------------------------------------------------------------------------------
# Command line


def test_cli_end_to_end(
    shards: tuple[str, list[str]], config: FilterConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from align_lightning.cli import main

    pattern, _ = shards
    out = tmp_path / "out"
    argv = ["filter", pattern, "--output", str(out), "--no-progress", "--max-texts-per-image", "5"]
    main([*argv, "--vocab-size", str(config.vocab_size), "--workers", "2", "--log-level", "WARNING"])
    printed = capsys.readouterr().out
    report = json.loads((out / "filter_report.json").read_text())
    expected = filter_shards(pattern, str(tmp_path / "api"), config=config, progress=False)
    assert report["totals"] == expected["totals"]
    assert re.search(rf"^kept\s+{report['totals']['kept']}\s", printed, re.MULTILINE)
    assert re.search(r"^dropped: text_shared\s+11\s", printed, re.MULTILINE)


def test_cli_help_documents_each_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        filtering.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in FilterConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    assert "(default: 200)" in text
    assert "(default: 1000)" in text


def test_cli_rejects_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        filtering.main(["x.tar", "--output", str(tmp_path), "--max-aspect-ratio", "1"])
    assert exit_info.value.code == 2
    assert "max_aspect_ratio must be > 1" in capsys.readouterr().err
