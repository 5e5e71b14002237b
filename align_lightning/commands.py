"""The inference commands: ``python -m align_lightning embed | classify | search`` (see each one's ``--help``).

Each takes the arguments after its name (as :data:`align_lightning.cli.TOOLS` calls it), reports bad input as
``<command>: error: <what is wrong and what to do>`` with exit status 1 before any heavy work where it can,
prints its results with rich (tables on stdout) and its progress and log on stderr.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from align_lightning.embeddings import EMBEDDING_SUFFIXES, Embeddings, check_embeddings_path

__all__ = ["classify_main", "embed_main", "search_main"]

_PROG = "python -m align_lightning"
_ERRORS = (ValueError, ImportError, OSError)


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr)


def _setup_logging() -> None:
    """Log records (skipped images, warnings) to stderr through rich, unless the application configured logging."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=_console(stderr=True), show_time=False, show_path=False)],
    )


def _add_model_arguments(parser: argparse.ArgumentParser, ckpt_required: bool = True) -> None:
    parser.add_argument(
        "--ckpt",
        required=ckpt_required,
        help="checkpoint written by `python -m align_lightning fit` (its tokenizer and preprocessing are used)"
        + ("" if ckpt_required else "; default: the checkpoint recorded in the embeddings file"),
    )
    parser.add_argument(
        "--device", default="auto", help="'auto' (CUDA when available, else CPU), 'cpu', 'cuda:1', ... (default: auto)"
    )


def _add_image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="evaluation resolution (resize, then center crop); default: the checkpoint's training data's",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images or texts per forward pass (default: 64)")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1),
        help="DataLoader processes decoding images (default: %(default)s, at most 4 and the CPUs available)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "num_workers" else 1):
            bound = "non-negative" if name == "num_workers" else "positive"
            parser.error(f"--{name.replace('_', '-')} must be {bound}, got {value}")


def _run(parser: argparse.ArgumentParser, work: Callable[[], None]) -> None:
    """Run a command's work, turning expected errors into ``<prog>: error: ...`` and exit status 1."""
    try:
        work()
    except _ERRORS as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")


# --------------------------------------------------------------------------------------------------
# embed
# --------------------------------------------------------------------------------------------------


def _embed_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{_PROG} embed",
        description=(
            "Embed images (a folder, searched recursively, or img2dataset webdataset shards) and texts (a file,\n"
            "one per line) with a trained checkpoint, and write the L2-normalised embeddings with their keys:\n"
            "image paths relative to the folder (or shard sample keys) and 1-based line numbers of the texts.\n"
            "The format follows the --out suffix: .npy (+ a .json sidecar with keys and metadata),\n"
            ".safetensors (keys in its metadata) or .parquet (needs pyarrow; columns modality, key, embedding).\n"
            "Images that cannot be decoded are skipped and counted, never fatal."
        ),
        epilog=(
            "examples:\n"
            f"  {_PROG} embed --ckpt runs/quickstart/version_0/checkpoints/last.ckpt \\\n"
            "      --images photos/ --texts captions.txt --out photos.safetensors\n"
            f"  {_PROG} embed --ckpt last.ckpt --images '/data/cc3m/{{00000..00009}}.tar' --out cc3m.npy\n"
            "\n"
            f"then:  {_PROG} search --index photos.safetensors --query 'a dog on a beach'"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(parser)
    parser.add_argument("--images", help="folder of images, an image file, or webdataset shard URLs (brace notation)")
    parser.add_argument("--texts", help="UTF-8 text file, one text per line (blank lines are skipped)")
    parser.add_argument(
        "--out", required=True, help=f"output file; its suffix picks the format ({', '.join(EMBEDDING_SUFFIXES)})"
    )
    _add_image_arguments(parser)
    return parser


def embed_main(argv: Sequence[str] | None = None) -> None:
    """``python -m align_lightning embed``: write image and text embeddings with keys (see ``--help``).

    Args:
        argv: The arguments after ``embed`` (``None``: ``sys.argv[1:]``).
    """
    from align_lightning.inference import ImageSource, embed, load_checkpoint, progress_bar, read_texts

    parser = _embed_parser()
    args = parser.parse_args(argv)
    _check_positive(parser, args, "batch_size", "num_workers", "image_size")
    if args.images is None and args.texts is None:
        parser.error("nothing to embed: give --images, --texts or both")

    def work() -> None:
        out = check_embeddings_path(args.out)
        source = ImageSource.resolve(args.images) if args.images is not None else None
        if args.texts is not None:
            read_texts(args.texts)  # a missing or empty file fails before the model is loaded
        _setup_logging()
        model = load_checkpoint(args.ckpt, device=args.device, image_size=args.image_size)
        with progress_bar(_console(stderr=True), enabled=not args.no_progress) as progress:
            embeddings = embed(
                model, source, args.texts, batch_size=args.batch_size, num_workers=args.num_workers, progress=progress
            )
        embeddings.save(out)
        skipped = embeddings.metadata["skipped"]
        skip_note = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())) or "none"
        _console().print(
            f"Wrote {len(embeddings.image_keys)} image and {len(embeddings.text_keys)} text embeddings "
            f"({embeddings.dim}-d) to {out} (skipped: {skip_note})."
        )

    _run(parser, work)


# --------------------------------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------------------------------


def _templates(values: Sequence[str] | None) -> list[str]:
    """``imagenet`` (CLIP's 80), a file (one template per line), or a template with ``{}``; any number of them."""
    from align_lightning.eval.zeroshot import IMAGENET_TEMPLATES

    templates: list[str] = []
    for value in values or ["imagenet"]:
        if value == "imagenet":
            templates += IMAGENET_TEMPLATES
        elif "{}" in value:
            templates.append(value)
        elif Path(value).is_file():
            lines = [line.strip() for line in Path(value).read_text(encoding="utf-8").splitlines() if line.strip()]
            bad = [line for line in lines if "{}" not in line]
            if bad or not lines:
                raise ValueError(f"Templates file {value}: every line needs {{}} where the class name goes: {bad[:3]}")
            templates += lines
        else:
            raise ValueError(
                f"--templates {value!r} is not 'imagenet', a template with {{}} (e.g. 'a photo of a {{}}.') nor a file."
            )
    return templates


def _classnames(args: argparse.Namespace) -> list[str]:
    if args.classes is not None:
        names = [name.strip() for name in args.classes.split(",") if name.strip()]
    else:
        path = Path(args.classnames)
        if not path.is_file():
            raise FileNotFoundError(f"Class names file {str(path)!r} not found (one class name per line).")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError("No class names given: --classes 'cat,dog' or --classnames FILE (one per line).")
    return names


def _classify_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{_PROG} classify",
        description=(
            "Zero-shot classification with a trained checkpoint: each class is the mean embedding of its\n"
            "prompts (CLIP's 80 ImageNet templates by default), and an image's class probabilities are\n"
            "softmax(logit_scale * cosine) with the model's learned temperature. Prints the top-k classes\n"
            "per image as a table; --csv writes every class's probability."
        ),
        epilog=(
            "examples:\n"
            f"  {_PROG} classify --ckpt last.ckpt --images photos/ --classes 'cat,dog,bird'\n"
            f"  {_PROG} classify --ckpt last.ckpt --images photos/ --classnames classes.txt \\\n"
            "      --templates 'a photo of a {}.' --templates 'a drawing of a {}.' --csv predictions.csv"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(parser)
    parser.add_argument(
        "--images", required=True, help="folder of images (searched recursively), an image file, or shards"
    )
    names = parser.add_mutually_exclusive_group(required=True)
    names.add_argument("--classes", help="comma-separated class names: 'cat,dog'")
    names.add_argument("--classnames", help="file with one class name per line")
    parser.add_argument(
        "--templates",
        action="append",
        help="'imagenet' (CLIP's 80, the default), a template with {} for the class name, or a file with one per "
        "line; repeat to combine",
    )
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per image (default: 5)")
    parser.add_argument("--csv", help="write image, prediction and every class's probability to this CSV file")
    _add_image_arguments(parser)
    return parser


def classify_main(argv: Sequence[str] | None = None) -> None:
    """``python -m align_lightning classify``: zero-shot predictions with probabilities (see ``--help``).

    Args:
        argv: The arguments after ``classify`` (``None``: ``sys.argv[1:]``).
    """
    from align_lightning.inference import ImageSource, classify, load_checkpoint, progress_bar

    parser = _classify_parser()
    args = parser.parse_args(argv)
    _check_positive(parser, args, "batch_size", "num_workers", "image_size", "top_k")

    def work() -> None:
        classnames = _classnames(args)
        templates = _templates(args.templates)
        source = ImageSource.resolve(args.images)
        _setup_logging()
        model = load_checkpoint(args.ckpt, device=args.device, image_size=args.image_size)
        with progress_bar(_console(stderr=True), enabled=not args.no_progress) as progress:
            predictions = classify(
                model,
                source,
                classnames,
                templates,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                progress=progress,
            )
        k = min(args.top_k, len(classnames))
        table = Table(title="Zero-shot predictions")
        table.add_column("image", overflow="fold")
        for rank in range(1, k + 1):
            table.add_column(f"top-{rank}", justify="left")
        probs, indices = predictions.top(k)
        for key, row_probs, row_indices in zip(predictions.keys, probs.tolist(), indices.tolist(), strict=True):
            table.add_row(key, *(f"{classnames[c]} {p:.1%}" for p, c in zip(row_probs, row_indices, strict=True)))
        console = _console()
        console.print(table)
        scale = model.logit_scale()
        console.print(
            f"{len(predictions.keys)} images, {len(classnames)} classes, {len(templates)} templates; "
            f"probabilities: softmax({scale:.2f} x cosine), 1 / temperature = {scale:.2f}"
        )
        if predictions.skipped:
            skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(predictions.skipped.items()))
            console.print(f"Skipped images: {skipped}")
        if args.csv is not None:
            _write_csv(Path(args.csv), predictions.keys, classnames, predictions.probs.tolist())
            console.print(f"Wrote every class's probability to {args.csv}")

    _run(parser, work)


def _write_csv(path: Path, keys: Sequence[str], classnames: Sequence[str], probs: Sequence[Sequence[float]]) -> None:
    """``image,prediction,<class 1>,<class 2>,...``: one row per image, probabilities in class order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "prediction", *classnames])
        for key, row in zip(keys, probs, strict=True):
            best = max(range(len(row)), key=row.__getitem__)
            writer.writerow([key, classnames[best], *(format(p, ".9g") for p in row)])


# --------------------------------------------------------------------------------------------------
# search
# --------------------------------------------------------------------------------------------------


def _search_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{_PROG} search",
        description=(
            "Text -> image search over the image embeddings written by `embed`: the k images most similar\n"
            "(cosine) to each query. Exact by default, scoring the index in chunks so that a large index never\n"
            "needs a full score matrix in memory (.npy indexes are memory-mapped); --backend faiss uses faiss's\n"
            "exact inner-product index when faiss is installed. The query is encoded by the checkpoint recorded\n"
            "in the embeddings file, or by --ckpt."
        ),
        epilog=(
            "examples:\n"
            f"  {_PROG} search --index photos.safetensors --query 'a dog on a beach'\n"
            f"  {_PROG} search --index cc3m.npy --query 'a red car' --query 'a bowl of soup' -k 10 --ckpt last.ckpt"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--index", required=True, help=f"embeddings file written by `embed` ({', '.join(EMBEDDING_SUFFIXES)})"
    )
    parser.add_argument("--query", action="append", required=True, help="query text; repeat for several queries")
    parser.add_argument("-k", "--top-k", dest="k", type=int, default=5, help="results per query (default: 5)")
    parser.add_argument(
        "--backend", choices=("exact", "faiss"), default="exact", help="search implementation (default: exact)"
    )
    _add_model_arguments(parser, ckpt_required=False)
    return parser


def _index_checkpoint(index: Embeddings, ckpt: str | None, index_path: str) -> str:
    if ckpt is not None:
        return ckpt
    recorded = index.metadata.get("checkpoint")
    if not recorded:
        raise ValueError(f"{index_path} records no checkpoint: pass --ckpt (the checkpoint that embedded it).")
    if not os.path.isfile(recorded):
        raise FileNotFoundError(
            f"{index_path} was embedded with {recorded}, which no longer exists: pass --ckpt with that "
            "checkpoint's new location."
        )
    return str(recorded)


def search_main(argv: Sequence[str] | None = None) -> None:
    """``python -m align_lightning search``: top-k text -> image search over embeddings (see ``--help``).

    Args:
        argv: The arguments after ``search`` (``None``: ``sys.argv[1:]``).
    """
    from align_lightning.inference import load_checkpoint, search

    parser = _search_parser()
    args = parser.parse_args(argv)
    _check_positive(parser, args, "k")

    def work() -> None:
        index = Embeddings.load(args.index, mmap=True)
        ckpt = _index_checkpoint(index, args.ckpt, args.index)
        _setup_logging()
        model = load_checkpoint(ckpt, device=args.device)
        results = search(index, args.query, model, args.k, backend=args.backend)
        console = _console()
        for query, matches in zip(args.query, results, strict=True):
            console.print(f"Query {query!r}: top {len(matches)} of {len(index.image_keys)} images")
            table = Table()
            table.add_column("rank", justify="right")
            table.add_column("image", overflow="fold")
            table.add_column("cosine", justify="right")
            for rank, match in enumerate(matches, start=1):
                table.add_row(str(rank), match.key, f"{match.score:.4f}")
            console.print(table)

    _run(parser, work)
