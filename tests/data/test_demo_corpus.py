"""Tests for align_lightning/data/demo_corpus.py: the demo data in img2dataset / Karpathy / ImageFolder form."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from align_lightning.data.demo import make_demo_samples
from align_lightning.data.demo_corpus import CORRUPT_KINDS, NOISE_KINDS, DemoCorpus, write_demo_corpus
from align_lightning.data.shards import (
    RawRecord,
    ShardDamage,
    SkippedSample,
    check_record,
    decode_caption,
    decode_image,
    expand_urls,
    iter_shard,
)

NUM_TRAIN, NUM_EVAL, SHARD_SIZE = 300, 20, 100
ARGS = {"num_train": NUM_TRAIN, "num_eval": NUM_EVAL, "shard_size": SHARD_SIZE, "seed": 0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> DemoCorpus:
    return write_demo_corpus(tmp_path_factory.mktemp("demo") / "corpus", **ARGS, num_workers=2)


@pytest.fixture(scope="module")
def records(corpus: DemoCorpus) -> list[RawRecord]:
    found = []
    for url in expand_urls(corpus.train_urls):
        for record in iter_shard(url, retries=0):
            assert not isinstance(record, ShardDamage), record
            found.append(record)
    return found


def _outcome(record: RawRecord) -> str:
    """What the training loader does with a record: "ok" or its skip reason."""
    checked = check_record(record)
    if isinstance(checked, SkippedSample):
        return checked.reason
    try:
        decode_caption(checked[2])
    except UnicodeDecodeError:
        return "bad_caption"
    try:
        decode_image(checked[1])
    except (OSError, ValueError, SyntaxError):
        return "corrupt_image"
    return "ok"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shards_are_img2dataset_format(corpus: DemoCorpus, records: list[RawRecord]) -> None:
    manifest = corpus.manifest
    train = manifest["train"]
    added = sum(k["count"] for k in train["noise"].values()) + sum(k["count"] for k in train["corrupt"].values())
    assert len(records) == train["num_records"] == NUM_TRAIN + added
    urls = expand_urls(corpus.train_urls)
    assert len(urls) == train["num_shards"] == -(-len(records) // SHARD_SIZE)
    assert [Path(u).name for u in urls] == [f"{i:05d}.tar" for i in range(len(urls))]
    for record in records:
        shard = urls.index(record.shard)
        assert record.key == f"{shard:05d}{record.index:04d}"  # img2dataset keys
        meta = json.loads(record.files["json"])
        assert meta["key"] == record.key
        assert meta["status"] == "success"
        if _outcome(record) == "ok":
            image = Image.open(io.BytesIO(record.files["jpg"]))
            assert image.format == "JPEG"
            assert (meta["width"], meta["height"]) == image.size
            assert meta["caption"] == record.files["txt"].decode()


def test_demo_pairs_come_from_make_demo_samples(corpus: DemoCorpus, records: list[RawRecord]) -> None:
    train = corpus.manifest["train"]
    added = {key for section in ("noise", "corrupt") for kind in train[section].values() for key in kind["keys"]}
    base = [r for r in records if r.key not in added]
    samples = make_demo_samples(NUM_TRAIN, 0, mismatch_rate=0.2, junk_rate=0.1)
    assert [r.files["txt"].decode() for r in base] == [s.caption for s in samples]
    assert train["pairs"] == dict(Counter(s.kind for s in samples))
    assert train["empty_captions"] == sum(1 for s in samples if not s.caption)
    sizes = {Image.open(io.BytesIO(r.files["jpg"])).size for r in base}
    assert sizes == {(256, 256)}  # shorter side > 200: ALIGN's size rule keeps them


def test_corrupt_records_are_skipped_for_the_right_reasons(corpus: DemoCorpus, records: list[RawRecord]) -> None:
    train = corpus.manifest["train"]
    outcomes = {r.key: _outcome(r) for r in records}
    for kind, info in train["corrupt"].items():
        assert info["count"] == CORRUPT_KINDS[kind]["count"] == len(info["keys"])
        assert {outcomes[key] for key in info["keys"]} == {info["skip_reason"]}, kind
    expected = Counter()
    for info in train["corrupt"].values():
        expected[info["skip_reason"]] += info["count"]
    expected["empty_file"] += train["empty_captions"]  # make_demo_samples' "" junk alt-texts
    skipped = Counter(outcome for outcome in outcomes.values() if outcome != "ok")
    assert skipped == expected
    assert set(skipped) == {"corrupt_image", "bad_caption", "missing_caption", "missing_image", "empty_file"}


def test_noise_kinds_break_exactly_their_align_rule(corpus: DemoCorpus, records: list[RawRecord]) -> None:
    noise = corpus.manifest["train"]["noise"]
    assert set(noise) == set(NOISE_KINDS)
    by_key = {r.key: r for r in records}
    caption_count = Counter(r.files.get("txt", b"") for r in records)
    unigram_count = Counter(w for r in records for w in r.files.get("txt", b"").decode("latin-1").lower().split())

    def sizes(kind: str) -> list[tuple[int, int]]:
        return [Image.open(io.BytesIO(by_key[k].files["jpg"])).size for k in noise[kind]["keys"]]

    def captions(kind: str) -> list[str]:
        return [by_key[k].files["txt"].decode() for k in noise[kind]["keys"]]

    assert all(min(size) <= 200 for size in sizes("small_image"))
    assert all(max(size) / min(size) >= 3 and min(size) > 200 for size in sizes("banner"))
    shared = captions("shared_alt_text")
    assert len(set(shared)) == 1
    assert caption_count[shared[0].encode()] == noise["shared_alt_text"]["count"] > 10
    assert len({hashlib.sha256(by_key[k].files["jpg"]).digest() for k in noise["shared_alt_text"]["keys"]}) > 10
    assert all(len(c.split()) < 3 for c in captions("few_words"))
    assert all(len(c.split()) > 20 for c in captions("many_words"))
    for caption in captions("rare_tokens"):
        assert min(unigram_count[w] for w in caption.split()) == 1  # a token seen nowhere else
    repeated = noise["repeated_image"]["keys"]
    assert len({by_key[k].files["jpg"] for k in repeated}) == 1
    assert len(set(captions("repeated_image"))) == len(repeated) == 4
    # Apart from the rule each kind breaks, the record is a normal pair.
    for kind in ("shared_alt_text", "few_words", "many_words", "rare_tokens", "repeated_image"):
        assert set(sizes(kind)) == {(256, 256)}, kind
    for kind in ("small_image", "banner", "shared_alt_text", "rare_tokens", "repeated_image"):
        assert all(3 <= len(c.split()) <= 20 for c in captions(kind)), kind
    for kind in ("small_image", "banner", "few_words", "many_words", "rare_tokens", "repeated_image"):
        assert all(caption_count[c.encode()] <= 10 for c in captions(kind)), kind


def test_karpathy_json_is_well_formed(corpus: DemoCorpus, records: list[RawRecord]) -> None:
    data = json.loads(corpus.karpathy_json.read_text())
    images = data["images"]
    assert Counter(entry["split"] for entry in images) == {"val": NUM_EVAL, "test": NUM_EVAL}
    train_hashes = {hashlib.sha256(r.files.get("jpg", b"")).digest() for r in records}
    for entry in images:
        path = corpus.image_root / entry["filepath"] / entry["filename"]
        assert path.is_file()
        assert Image.open(path).size == (256, 256)
        assert hashlib.sha256(path.read_bytes()).digest() not in train_hashes  # held out
        raws = [sentence["raw"] for sentence in entry["sentences"]]
        assert len(raws) == len(set(raws)) == 5
        assert all(3 <= len(raw.split()) <= 20 for raw in raws)
    assert len({(e["filepath"], e["filename"]) for e in images}) == len(images)


def test_zeroshot_imagefolder_is_well_formed(corpus: DemoCorpus) -> None:
    class_dirs = sorted(p.name for p in corpus.zeroshot_root.iterdir() if p.is_dir())
    classnames = corpus.classnames_file.read_text().splitlines()
    assert len(class_dirs) == len(classnames) == 48
    assert classnames == [d.replace("_", " ") for d in class_dirs]
    assert "red circle" in classnames
    for class_dir in class_dirs:
        files = list((corpus.zeroshot_root / class_dir).iterdir())
        assert files
        assert all(f.suffix == ".jpg" and Image.open(f).size == (256, 256) for f in files)
    assert corpus.templates
    assert all("{}" in t for t in corpus.templates)
    assert corpus.templates_file.read_text().splitlines() == list(corpus.templates)


def test_second_call_reuses_the_corpus(corpus: DemoCorpus) -> None:
    before = {p: p.stat().st_mtime_ns for p in (corpus.manifest_file, *map(Path, expand_urls(corpus.train_urls)))}
    again = write_demo_corpus(corpus.root, **ARGS)
    assert again == corpus
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert not list(corpus.root.parent.glob(".corpus.*"))  # no temporary folders left


def test_same_seed_gives_identical_bytes(corpus: DemoCorpus, tmp_path: Path) -> None:
    other = write_demo_corpus(tmp_path / "other", **ARGS, num_workers=0)  # in process: same bytes
    assert _files(other.root) == _files(corpus.root)


def test_other_arguments_replace_a_corpus_and_other_folders_are_refused(tmp_path: Path) -> None:
    small = {"num_train": 20, "num_eval": 2, "shard_size": 50, "noise": False, "num_workers": 0}
    first = write_demo_corpus(tmp_path / "c", seed=1, **small)
    assert first.manifest["arguments"]["seed"] == 1
    assert first.manifest["train"]["noise"] == {}
    assert first.manifest["train"]["num_records"] == 20
    second = write_demo_corpus(tmp_path / "c", seed=2, **small)
    assert second.manifest["arguments"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a demo corpus"):
        write_demo_corpus(tmp_path / "mine", **small)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_racing_writers_and_killed_writers_leave_one_complete_corpus(tmp_path: Path) -> None:
    small = {"num_train": 30, "num_eval": 2, "shard_size": 16, "num_workers": 0}
    # A writer killed earlier on this host left its temporary folder.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".c.incomplete-{socket.gethostname()}-{int(dead.stdout)}-0123abcd"
    (leftover / "train").mkdir(parents=True)
    results: list[DemoCorpus] = []
    threads = [threading.Thread(target=lambda: results.append(write_demo_corpus(tmp_path / "c", **small)))]
    threads.append(threading.Thread(target=lambda: results.append(write_demo_corpus(tmp_path / "c", **small))))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2
    assert results[0] == results[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert results[0].manifest["train"]["num_records"] == 30 + sum(
        kind["count"] for section in ("noise", "corrupt") for kind in results[0].manifest["train"][section].values()
    )
