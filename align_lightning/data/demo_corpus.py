"""The demo data written in the real formats: img2dataset shards, a Karpathy split JSON and an ImageFolder.

:func:`write_demo_corpus` renders the demo pairs of :mod:`align_lightning.data.demo` to disk in the
formats a real user's data comes in (``shared/DESIGN.md``), so the quickstart exercises the same
code path: img2dataset shards -> the ALIGN filter tool -> ``WebDataModule`` training, then
Karpathy-JSON retrieval and ImageFolder zero-shot evaluation. Layout under ``root``::

    manifest.json                 # arguments, counts and keys of every kind of record (written last)
    train/00000.tar ...           # img2dataset webdataset shards: {key}.jpg, {key}.txt, {key}.json
    eval/dataset_demo.json        # Karpathy split JSON ("val" and "test" splits, 5 captions per image)
    eval/images/*.jpg             # its images (image root: eval/)
    zeroshot/val/<class>/*.jpg    # ImageFolder: one class per colour and shape ("red_circle")
    zeroshot/classnames.txt       # "red circle", one per line, in sorted class-folder order
    zeroshot/templates.txt        # prompt templates with {}

The training shards hold the noisy pairs of :func:`~align_lightning.data.demo.make_demo_samples`
(20% mismatched, 10% junk alt-texts) and, with ``noise=True``, known small amounts of the web noise
ALIGN's filtering rules remove (``shared/ALIGN.md``), and of corrupt records the loader must skip
and count. The keys of each are listed in ``manifest.json`` (see :data:`NOISE_KINDS` and
:data:`CORRUPT_KINDS`), so tests can check exactly what the filter and the loader drop.

ALIGN's image rule "more than 1,000 alt-texts for one image" is not reproduced at that scale
(a demo corpus of 1,000 copies of one image would teach nothing); instead one image appears with
:data:`REPEATED_IMAGE_ALT_TEXTS` different alt-texts (kind ``repeated_image``), kept by the paper's
threshold and removed when the filter's threshold is configured below that number.

Writing is idempotent and safe under concurrency: the corpus is written into a temporary sibling
folder, ``manifest.json`` last, then renamed into place; a complete corpus with the same arguments
is reused as is. So racing processes (DDP ranks) or a killed writer never leave a half corpus.
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import socket
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from align_lightning.data.demo import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    DemoSample,
    make_demo_samples,
    render_demo_image,
)
from align_lightning.data.shards import ShardWriter

__all__ = [
    "CORRUPT_KINDS",
    "DEFAULT_TEMPLATES",
    "NOISE_KINDS",
    "DemoCorpus",
    "write_demo_corpus",
]

logger = logging.getLogger(__name__)

FORMAT = "align_lightning demo corpus"
#: Bumped whenever the written bytes change for the same arguments (an older corpus is then rewritten).
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KARPATHY_FILE = "dataset_demo.json"
JPEG_QUALITY = 90

#: Zero-shot prompt templates (``{}`` is replaced by a class name such as ``"red circle"``).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {} icon.",
    "a picture of a {}.",
    "clipart of a {}.",
    "a {} on a plain background.",
    "a drawing of a small {}.",
    "a drawing of a large {}.",
)

#: Clean, complete phrasings of one image's content: the retrieval captions (five per image, as
#: Flickr30K and COCO) and the alt-texts of the noise records that only an image rule should remove.
EVAL_PHRASINGS: tuple[str, ...] = (
    "a {size} {color} {shape} at the {position} on a {background} background",
    "photo of a {size} {color} {shape} at the {position} of a {background} picture",
    "{size} {color} {shape} near the {position}, {background} background",
    "a {background} picture with a {size} {color} {shape} at the {position}",
    "stock image: {size} {color} {shape}, {position} of the frame, {background} background",
)

# --- the web noise added to the training shards (noise=True), by kind ---
#: (width, height) of images whose shorter side is <= 200 px (ALIGN keeps shorter side > 200).
SMALL_IMAGE_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (128, 128), (200, 200), (200, 320), (320, 180), (150, 300))
#: (width, height) of banners: aspect ratio >= 3 (ALIGN keeps < 3), shorter side > 200 px.
BANNER_SIZES: tuple[tuple[int, int], ...] = ((768, 256), (660, 220), (900, 240), (1000, 300), (256, 800), (240, 960))
#: One boilerplate alt-text on more than 10 different images (ALIGN drops texts shared by > 10).
SHARED_ALT_TEXT = "free stock image download"
SHARED_ALT_TEXT_IMAGES = 12
#: Alt-texts with fewer than 3 unigrams ("red circle"), more than 20, and with a random gibberish token.
NUM_FEW_WORDS = 6
NUM_MANY_WORDS = 6
NUM_RARE_TOKENS = 6
#: One image with this many different alt-texts (see the module docstring).
REPEATED_IMAGE_ALT_TEXTS = 4

#: Noise kinds: the ALIGN rule that removes each, and whether the paper's thresholds remove it.
NOISE_KINDS: dict[str, dict[str, Any]] = {
    "small_image": {"rule": "image shorter side <= 200 px", "removed_by_default": True},
    "banner": {"rule": "image aspect ratio >= 3", "removed_by_default": True},
    "shared_alt_text": {"rule": "alt-text shared by more than 10 images", "removed_by_default": True},
    "few_words": {"rule": "alt-text with fewer than 3 unigrams", "removed_by_default": True},
    "many_words": {"rule": "alt-text with more than 20 unigrams", "removed_by_default": True},
    "rare_tokens": {"rule": "alt-text with a rare token (random gibberish, seen once)", "removed_by_default": True},
    "repeated_image": {
        "rule": f"image with more alt-texts than the threshold (ALIGN: 1000; here {REPEATED_IMAGE_ALT_TEXTS})",
        "removed_by_default": False,
    },
}

#: Corrupt records: how each is broken, and the skip reason the loader must count it under
#: (``corrupt_image`` and ``bad_caption`` show when decoding; the others in ``check_record``).
CORRUPT_KINDS: dict[str, dict[str, Any]] = {
    "garbage_image": {"count": 2, "skip_reason": "corrupt_image", "what": "random bytes as .jpg"},
    "truncated_image": {"count": 1, "skip_reason": "corrupt_image", "what": "the first 60% of a JPEG"},
    "cp1252_caption": {"count": 1, "skip_reason": "bad_caption", "what": "alt-text encoded as Windows-1252"},
    "utf16_caption": {"count": 1, "skip_reason": "bad_caption", "what": "alt-text encoded as UTF-16"},
    "missing_caption": {"count": 1, "skip_reason": "missing_caption", "what": "no .txt member"},
    "empty_image": {"count": 1, "skip_reason": "empty_file", "what": "a zero-byte .jpg"},
    "missing_image": {"count": 1, "skip_reason": "missing_image", "what": "no image member"},
}

_SEED_STRIDE = 1_000_003  # render seed of item i of a split with seed s: s * _SEED_STRIDE + i (as DemoDataModule)
_GIBBERISH_LETTERS = "bcdfghjklmnpqrstvwxz"


@dataclass(frozen=True)
class DemoCorpus:
    """Where a written demo corpus is (all paths absolute).

    Attributes:
        root: The corpus folder.
        train_urls: Brace pattern of the training shards (``"/.../train/{00000..00008}.tar"``), for
            the filter tool or ``WebDataModule(train_urls=...)``.
        karpathy_json: The Karpathy split JSON of the retrieval evaluation (splits ``"val"`` and ``"test"``).
        image_root: The folder its ``filepath/filename`` entries are relative to.
        zeroshot_root: The ImageFolder root (the folder holding one sub-folder per class).
        classnames_file: Class names, one per line, in sorted class-folder order.
        templates: Zero-shot prompt templates, each with ``{}`` for the class name.
        templates_file: The same templates, one per line.
        manifest_file: ``manifest.json``: the arguments, counts and keys of each kind of record.
    """

    root: Path
    train_urls: str
    karpathy_json: Path
    image_root: Path
    zeroshot_root: Path
    classnames_file: Path
    templates: tuple[str, ...]
    templates_file: Path
    manifest_file: Path

    @property
    def manifest(self) -> dict[str, Any]:
        """The parsed ``manifest.json``."""
        return json.loads(self.manifest_file.read_text())


@dataclass(frozen=True)
class _Item:
    """One image (and, for a training record, its alt-text and how the record is broken)."""

    sample: DemoSample
    render_seed: int
    width: int
    height: int
    kind: str
    corrupt: str | None = None


# ----------------------------------------------------------------------------- planning


def _phrase(sample: DemoSample, template: str) -> str:
    return template.format(
        size=sample.size, color=sample.color, shape=sample.shape, position=sample.position, background=sample.background
    )


def _noise_items(seed: int, image_size: int) -> list[_Item]:
    """The web noise and corrupt records added to the training shards, in a fixed order."""
    split_seed = seed + 4
    count = (
        len(SMALL_IMAGE_SIZES)
        + len(BANNER_SIZES)
        + SHARED_ALT_TEXT_IMAGES
        + NUM_FEW_WORDS
        + NUM_MANY_WORDS
        + NUM_RARE_TOKENS
        + 1
        + sum(kind["count"] for kind in CORRUPT_KINDS.values())
    )
    contents = iter(make_demo_samples(count, split_seed))  # clean, complete captions
    render_seeds = iter(range(split_seed * _SEED_STRIDE, split_seed * _SEED_STRIDE + count))
    rng = np.random.default_rng([seed, 4])
    items: list[_Item] = []

    def add(kind: str, caption: str | None = None, size: tuple[int, int] | None = None, **kw: Any) -> None:
        sample = next(contents)
        if caption is not None:
            sample = replace(sample, caption=caption)
        width, height = size or (image_size, image_size)
        items.append(_Item(sample, next(render_seeds), width, height, kind, **kw))

    for size in SMALL_IMAGE_SIZES:
        add("small_image", size=size)
    for size in BANNER_SIZES:
        add("banner", size=size)
    for _ in range(SHARED_ALT_TEXT_IMAGES):
        add("shared_alt_text", caption=SHARED_ALT_TEXT)
    combos = [(color, shape) for color in COLORS for shape in SHAPES]
    for index in rng.permutation(len(combos))[:NUM_FEW_WORDS]:
        color, shape = combos[index]
        sample = next(contents)
        # Match the image to its two-word alt-text (keeping the shape visible on its background).
        background = "dark" if color == "white" else "light" if color == "black" else sample.background
        sample = replace(sample, color=color, shape=shape, background=background, caption=f"{color} {shape}")
        items.append(_Item(sample, next(render_seeds), image_size, image_size, "few_words"))
    for _ in range(NUM_MANY_WORDS):
        sample = next(contents)
        other = make_demo_samples(1, int(rng.integers(2**31)))[0]
        caption = (
            f"{_phrase(sample, 'a {size} {color} {shape} at the {position} of a {background} background')}, "
            f"{_phrase(other, 'a {size} {color} {shape} at the {position} of a {background} picture')}, "
            f"{sample.color} {sample.shape} icon"
        )  # 25 unigrams
        items.append(_Item(replace(sample, caption=caption), next(render_seeds), image_size, image_size, "many_words"))
    for _ in range(NUM_RARE_TOKENS):
        gibberish = "".join(rng.choice(list(_GIBBERISH_LETTERS), size=9))
        sample = next(contents)
        caption = f"a {sample.color} {sample.shape} {gibberish}"
        items.append(_Item(replace(sample, caption=caption), next(render_seeds), image_size, image_size, "rare_tokens"))
    repeated = next(contents)
    repeated_seed = next(render_seeds)
    for template in EVAL_PHRASINGS[:REPEATED_IMAGE_ALT_TEXTS]:  # identical image bytes, different alt-texts
        sample = replace(repeated, caption=_phrase(repeated, template))
        items.append(_Item(sample, repeated_seed, image_size, image_size, "repeated_image"))
    for kind, spec in CORRUPT_KINDS.items():
        for _ in range(spec["count"]):
            add(kind, corrupt=kind)
    return items


def _train_plan(num_train: int, seed: int, image_size: int, noise: bool) -> list[_Item]:
    """Every training record in shard order: the demo pairs, with the noise spread among them."""
    samples = make_demo_samples(num_train, seed, mismatch_rate=0.2, junk_rate=0.1)
    base = [
        _Item(sample, seed * _SEED_STRIDE + i, image_size, image_size, sample.kind) for i, sample in enumerate(samples)
    ]
    if not noise:
        return base
    extras = _noise_items(seed, image_size)
    rng = np.random.default_rng([seed, 5])
    total = len(base) + len(extras)
    order = rng.permutation(len(extras))
    positions = dict(
        zip(sorted(rng.choice(total, size=len(extras), replace=False).tolist()), order.tolist(), strict=True)
    )
    base_iter = iter(base)
    return [extras[positions[i]] if i in positions else next(base_iter) for i in range(total)]


def _zeroshot_plan(num_eval: int, seed: int, image_size: int) -> list[tuple[str, _Item]]:
    """Balanced zero-shot images: ``(class folder, item)``, ``ceil(num_eval / classes)`` per class."""
    classes = sorted((f"{color}_{shape}", color, shape) for color in COLORS for shape in SHAPES)
    per_class = max(1, math.ceil(num_eval / len(classes)))
    split_seed = seed + 3
    rng = np.random.default_rng(split_seed)
    plan = []
    for j in range(per_class):
        for folder, color, shape in classes:
            background = (
                "dark" if color == "white" else "light" if color == "black" else str(rng.choice(list(BACKGROUNDS)))
            )
            sample = DemoSample(
                shape=shape,
                color=color,
                size=str(rng.choice(SIZES)),
                position=str(rng.choice(POSITIONS)),
                background=background,
                caption=f"{color} {shape}",
            )
            item = _Item(sample, split_seed * _SEED_STRIDE + len(plan), image_size, image_size, "zeroshot")
            plan.append((f"{folder}/{folder}_{j:04d}.jpg", item))
    return plan


# ----------------------------------------------------------------------------- rendering


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _render(item: _Item) -> Image.Image:
    """The item's image: rendered square at the shorter side, centred on its background if not square."""
    side = min(item.width, item.height)
    image = render_demo_image(item.sample, side, seed=item.render_seed)
    if item.width == item.height:
        return image
    canvas = Image.new("RGB", (item.width, item.height), BACKGROUNDS[item.sample.background])
    canvas.paste(image, ((item.width - side) // 2, (item.height - side) // 2))
    return canvas


def _record_files(key: str, item: _Item) -> dict[str, bytes]:
    """The members of one training record, img2dataset style (broken as ``item.corrupt`` says)."""
    caption: str | None = item.sample.caption
    image = _jpeg(_render(item)) if item.corrupt not in ("garbage_image", "empty_image", "missing_image") else b""
    text = caption.encode("utf-8") if caption is not None else b""
    if item.corrupt == "garbage_image":
        image = np.random.default_rng(item.render_seed).bytes(4096)
    elif item.corrupt == "truncated_image":
        image = image[: len(image) * 6 // 10]
    elif item.corrupt == "cp1252_caption":
        text, caption = f"{caption} (café)".encode("cp1252"), None
    elif item.corrupt == "utf16_caption":
        text, caption = caption.encode("utf-16"), None
    meta = {
        "url": f"https://demo.invalid/images/{key}.jpg",
        "key": key,
        "status": "success",
        "error_message": None,
        "width": item.width,
        "height": item.height,
        "original_width": item.width,
        "original_height": item.height,
        "caption": caption if item.corrupt != "missing_caption" else None,
    }
    files = {"jpg": image, "txt": text, "json": json.dumps(meta).encode()}
    if item.corrupt == "missing_caption":
        del files["txt"]
    elif item.corrupt == "missing_image":
        del files["jpg"]
    return files


def _write_shard(task: tuple[str, list[tuple[str, _Item]]]) -> str:
    url, records = task
    with ShardWriter(url, max_samples=None) as writer:
        for key, item in records:
            writer.write(key, _record_files(key, item))
    return url


def _write_images(task: list[tuple[str, _Item]]) -> int:
    for path, item in task:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(_jpeg(_render(item)))
    return len(task)


def _run_task(task: tuple[str, Any]) -> None:
    kind, payload = task
    if kind == "shard":
        _write_shard(payload)
    else:
        _write_images(payload)


def _run_tasks(tasks: Sequence[tuple[str, Any]], num_workers: int) -> None:
    if num_workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            _run_task(task)
        return
    # fork: the workers inherit the imported modules (a fresh interpreter would spend seconds
    # importing torch before rendering anything). The output does not depend on the worker count.
    # Python >= 3.12 warns about forking a process with threads (BLAS/OpenMP pools are threads);
    # the workers only render with numpy/PIL and write files, as PyTorch's DataLoader workers do.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*use of fork\(\) may lead to deadlocks", category=DeprecationWarning
        )
        pool = multiprocessing.get_context("fork").Pool(min(num_workers, len(tasks)))
    with pool:
        for _ in pool.imap_unordered(_run_task, tasks):
            pass


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- writing


def _write_corpus(folder: Path, arguments: dict[str, Any], num_workers: int) -> dict[str, Any]:
    """Write the whole corpus into ``folder`` (``manifest.json`` last); returns the manifest."""
    num_train, num_eval, image_size = arguments["num_train"], arguments["num_eval"], arguments["image_size"]
    shard_size, seed = arguments["shard_size"], arguments["seed"]
    tasks: list[tuple[str, Any]] = []

    # Training shards: img2dataset keys are the shard number then the index in the shard.
    plan = _train_plan(num_train, seed, image_size, arguments["noise"])
    num_shards = math.ceil(len(plan) / shard_size)
    digits = max(4, len(str(shard_size - 1)))
    keyed = [(f"{i // shard_size:05d}{i % shard_size:0{digits}d}", item) for i, item in enumerate(plan)]
    (folder / "train").mkdir(parents=True)
    for shard in range(num_shards):
        url = str(folder / "train" / f"{shard:05d}.tar")
        tasks.append(("shard", (url, keyed[shard * shard_size : (shard + 1) * shard_size])))

    # Retrieval: Karpathy split JSON over held-out clean images (other seeds than training).
    images: list[tuple[str, _Item]] = []
    entries = []
    sentence_id = 0
    for split, split_seed in (("val", seed + 1), ("test", seed + 2)):
        for i, sample in enumerate(make_demo_samples(num_eval, split_seed)):
            filename = f"{split}_{i:05d}.jpg"
            item = _Item(sample, split_seed * _SEED_STRIDE + i, image_size, image_size, "eval")
            images.append((str(folder / "eval" / "images" / filename), item))
            raws = [_phrase(sample, template) for template in EVAL_PHRASINGS]
            sentences = [
                {
                    "raw": raw,
                    "tokens": re.findall(r"\w+", raw.lower()),
                    "imgid": len(entries),
                    "sentid": sentence_id + j,
                }
                for j, raw in enumerate(raws)
            ]
            entries.append(
                {
                    "filepath": "images",
                    "filename": filename,
                    "imgid": len(entries),
                    "split": split,
                    "sentids": [s["sentid"] for s in sentences],
                    "sentences": sentences,
                }
            )
            sentence_id += len(sentences)
    (folder / "eval").mkdir()
    (folder / "eval" / KARPATHY_FILE).write_text(json.dumps({"images": entries, "dataset": "demo"}) + "\n")

    # Zero-shot: ImageFolder, one class per colour and shape.
    zeroshot = _zeroshot_plan(num_eval, seed, image_size)
    images += [(str(folder / "zeroshot" / "val" / path), item) for path, item in zeroshot]
    class_dirs = sorted({path.split("/")[0] for path, _ in zeroshot})
    (folder / "zeroshot").mkdir()
    (folder / "zeroshot" / "classnames.txt").write_text("".join(f"{d.replace('_', ' ')}\n" for d in class_dirs))
    (folder / "zeroshot" / "templates.txt").write_text("".join(f"{t}\n" for t in DEFAULT_TEMPLATES))

    chunk = 128
    tasks += [("images", images[i : i + chunk]) for i in range(0, len(images), chunk)]
    _run_tasks(tasks, num_workers)

    kinds = Counter(item.kind for item in plan)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arguments": arguments,
        "train": {
            "urls": f"train/{{00000..{num_shards - 1:05d}}}.tar",
            "num_shards": num_shards,
            "num_records": len(plan),
            # The demo pairs (make_demo_samples); junk alt-texts include "" (an empty .txt: skipped
            # by the loader as empty_file) and short or boilerplate texts the filter also removes.
            "pairs": {kind: kinds[kind] for kind in ("clean", "mismatched", "junk")},
            "empty_captions": sum(1 for item in plan if item.corrupt is None and not item.sample.caption),
            "noise": {
                kind: {**info, "count": kinds[kind], "keys": [key for key, item in keyed if item.kind == kind]}
                for kind, info in NOISE_KINDS.items()
                if kinds[kind]
            },
            "corrupt": {
                kind: {**info, "keys": [key for key, item in keyed if item.corrupt == kind]}
                for kind, info in CORRUPT_KINDS.items()
                if kinds[kind]
            },
        },
        "eval": {
            "karpathy_json": f"eval/{KARPATHY_FILE}",
            "image_root": "eval",
            "splits": {"val": num_eval, "test": num_eval},
            "captions_per_image": len(EVAL_PHRASINGS),
        },
        "zeroshot": {
            "root": "zeroshot/val",
            "classnames": "zeroshot/classnames.txt",
            "templates": list(DEFAULT_TEMPLATES),
            "num_classes": len(class_dirs),
            "images_per_class": len(zeroshot) // len(class_dirs),
        },
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def _corpus(root: Path, manifest: dict[str, Any]) -> DemoCorpus:
    zeroshot = manifest["zeroshot"]
    return DemoCorpus(
        root=root,
        train_urls=str(root / manifest["train"]["urls"]),
        karpathy_json=root / manifest["eval"]["karpathy_json"],
        image_root=root / manifest["eval"]["image_root"],
        zeroshot_root=root / zeroshot["root"],
        classnames_file=root / zeroshot["classnames"],
        templates=tuple(zeroshot["templates"]),
        templates_file=root / "zeroshot" / "templates.txt",
        manifest_file=root / MANIFEST,
    )


def _complete(root: Path, arguments: dict[str, Any]) -> DemoCorpus | None:
    """The corpus in ``root`` if it is complete and was written with ``arguments`` by this version."""
    manifest = _read_manifest(root)
    if manifest is None or manifest.get("format_version") != FORMAT_VERSION or manifest.get("arguments") != arguments:
        return None
    corpus = _corpus(root, manifest)
    shards = [root / "train" / f"{i:05d}.tar" for i in range(manifest["train"]["num_shards"])]
    if not all(path.is_file() for path in (*shards, corpus.karpathy_json, corpus.classnames_file)):
        return None
    return corpus


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers(root: Path) -> None:
    """Remove temporary folders of killed writers on this host, and replaced corpora."""
    host = socket.gethostname()
    for path in root.parent.glob(f".{root.name}.*"):
        parts = path.name[len(root.name) + 2 :].split("-")
        ours = parts[0] == "incomplete" and len(parts) >= 4 and "-".join(parts[1:-2]) == host and parts[-2].isdigit()
        if (ours and not _pid_alive(int(parts[-2]))) or parts[0] == "replaced":
            shutil.rmtree(path, ignore_errors=True)


def _move_into_place(folder: Path, root: Path, arguments: dict[str, Any]) -> DemoCorpus:
    """Rename the written ``folder`` to ``root``, or use the complete corpus another process put there."""
    for _ in range(5):
        try:
            folder.rename(root)  # atomic; replaces nothing but an empty folder
        except OSError:
            corpus = _complete(root, arguments)
            if corpus is not None:  # another writer won the race with the same corpus
                shutil.rmtree(folder, ignore_errors=True)
                return corpus
            if _read_manifest(root) is None:
                raise FileExistsError(
                    f"{root} exists and is not a demo corpus (no {MANIFEST} from write_demo_corpus): "
                    "give an empty or new folder."
                ) from None
            # A demo corpus written with other arguments: move it aside, then retry.
            aside = root.parent / f".{root.name}.replaced-{uuid.uuid4().hex[:8]}"
            try:
                root.rename(aside)
            except FileNotFoundError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
            continue
        manifest = _read_manifest(root)
        assert manifest is not None
        return _corpus(root, manifest)
    raise RuntimeError(f"Could not move the demo corpus into {root}: other writers keep replacing it.")


def write_demo_corpus(
    root: str | os.PathLike[str],
    *,
    num_train: int = 8192,
    num_eval: int = 512,
    image_size: int = 256,
    shard_size: int = 1024,
    seed: int = 0,
    noise: bool = True,
    num_workers: int | None = None,
) -> DemoCorpus:
    """Write the demo data as img2dataset shards, a Karpathy split JSON and an ImageFolder (see the module doc).

    Returns at once when ``root`` already holds a complete corpus written with the same arguments
    (checked in its ``manifest.json``, which is written last). Otherwise the corpus is written into
    a temporary sibling folder and renamed to ``root``, so concurrent callers (e.g. every DDP rank)
    and killed writers never leave a partial corpus; a demo corpus with other arguments in ``root``
    is replaced. The bytes written depend only on the arguments (not on ``num_workers``).

    Args:
        root: Local folder of the corpus (created; its parent too).
        num_train: Demo pairs in the training shards (20% mismatched and 10% junk alt-texts, like
            the ``DemoDataModule``'s); with ``noise``, the extra records of :data:`NOISE_KINDS` and
            :data:`CORRUPT_KINDS` come on top.
        num_eval: Images in each of the Karpathy ``val`` and ``test`` splits (5 captions each), and
            about the number of zero-shot images (``ceil(num_eval / 48)`` per class, 48 classes).
        image_size: Side of the rendered square images. ALIGN's filter keeps images whose shorter
            side is above 200 px, so keep it above 200 for the filter to keep the normal pairs.
        shard_size: Records per shard (the last shard may hold fewer).
        seed: Seed of everything; training, validation, test and zero-shot images use different
            derived seeds, so the evaluation images are held out.
        noise: Add the web noise and corrupt records (see the module doc).
        num_workers: Processes rendering in parallel (``None``: the available CPUs; ``0`` or ``1``:
            in this process). Needs the ``fork`` start method (Linux); elsewhere it runs in this process.

    Returns:
        The paths of the corpus.

    Raises:
        ValueError: For non-positive sizes or counts.
        FileExistsError: If ``root`` exists and holds something other than a demo corpus.
    """
    for name, value in (("num_train", num_train), ("num_eval", num_eval), ("image_size", image_size)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}.")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}.")
    if image_size <= 200:
        logger.warning(
            "image_size=%d: ALIGN's filter drops images whose shorter side is <= 200 px, so it would drop "
            "every demo pair; use image_size > 200 to run the filter on this corpus.",
            image_size,
        )
    arguments = {
        "num_train": num_train,
        "num_eval": num_eval,
        "image_size": image_size,
        "shard_size": shard_size,
        "seed": seed,
        "noise": noise,
    }
    root = Path(root).absolute()
    corpus = _complete(root, arguments)
    if corpus is not None:
        logger.info("Using the demo corpus in %s (complete, same arguments).", root)
        return corpus
    if root.exists() and (not root.is_dir() or any(root.iterdir())) and _read_manifest(root) is None:
        raise FileExistsError(
            f"{root} exists and is not a demo corpus (no {MANIFEST} from write_demo_corpus): "
            "give an empty or new folder."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    folder = root.parent / f".{root.name}.incomplete-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if num_workers is None:
        num_workers = _available_cpus()
    if "fork" not in multiprocessing.get_all_start_methods():
        num_workers = 0
    start = time.perf_counter()
    try:
        folder.mkdir()
        manifest = _write_corpus(folder, arguments, num_workers)
        corpus = _move_into_place(folder, root, arguments)
    finally:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
    logger.info(
        "Wrote the demo corpus to %s in %.1f s: %d training records in %d shards, %d+%d retrieval images, "
        "%d zero-shot classes.",
        root,
        time.perf_counter() - start,
        manifest["train"]["num_records"],
        manifest["train"]["num_shards"],
        num_eval,
        num_eval,
        manifest["zeroshot"]["num_classes"],
    )
    return corpus
