"""Embedding files: image and text embeddings with their keys, in ``.npy``, ``.safetensors`` or parquet, and exact
top-k search over them.

What ``python -m align_lightning embed`` and ``predict`` with :class:`~align_lightning.callbacks.EmbeddingWriter`
write, and ``python -m align_lightning search`` reads. The format is chosen by the file's suffix:

* ``.safetensors``: tensors ``image_embeds`` ``(N_images, D)`` and ``text_embeds`` ``(N_texts, D)`` (those
  present); the header's metadata holds ``image_keys`` and ``text_keys`` (JSON lists) and ``align_lightning``
  (JSON: the checkpoint, preprocessing and sources).
* ``.npy``: one float32 array, the image rows followed by the text rows, plus a sidecar ``<stem>.json`` with
  ``image_keys``, ``text_keys`` (row ``i`` is image ``image_keys[i]`` for ``i < len(image_keys)``, then text
  ``text_keys[i - len(image_keys)]``) and ``metadata``. ``np.load`` reads the array as is.
* ``.parquet`` (needs ``pyarrow``): one row per embedding, columns ``modality`` (``"image"`` / ``"text"``), ``key``
  and ``embedding`` (a fixed-size list of float32); the schema metadata ``align_lightning`` holds the JSON metadata.

Keys are image paths relative to the embedded folder, webdataset sample keys, or 1-based line numbers of the
texts file. Embeddings are L2-normalised float32, so a dot product is the cosine similarity.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["EMBEDDING_SUFFIXES", "Embeddings", "check_embeddings_path", "gather_rows_on_rank_zero", "top_k"]

#: Output suffixes and the format each selects.
EMBEDDING_SUFFIXES: tuple[str, ...] = (".npy", ".safetensors", ".parquet")
_FORMAT = "align_lightning.embeddings"
_VERSION = 1
_MODALITIES = ("image", "text")


def check_embeddings_path(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` names a supported embedding file format whose library is installed.

    Called before any heavy work, so a bad ``--out`` fails at once.

    Raises:
        ValueError: For a suffix other than ``.npy``, ``.safetensors`` or ``.parquet``.
        ImportError: For ``.parquet`` without ``pyarrow`` or ``.safetensors`` without ``safetensors``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EMBEDDING_SUFFIXES:
        raise ValueError(
            f"Cannot write embeddings to {str(path)!r}: unknown suffix {suffix or '(none)'!r}. "
            f"Name the file with one of {', '.join(EMBEDDING_SUFFIXES)} (the suffix selects the format)."
        )
    for format_suffix, module, package in ((".parquet", "pyarrow", "pyarrow"), (".safetensors", "safetensors", "")):
        if suffix == format_suffix and importlib.util.find_spec(module) is None:
            raise ImportError(
                f"Writing {format_suffix} files needs the {module!r} package, which is not installed: "
                f"pip install {package or module}, or choose another suffix ({', '.join(EMBEDDING_SUFFIXES)})."
            )
    return path


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


@dataclass
class Embeddings:
    """Image and text embeddings with their keys and provenance.

    Attributes:
        image_embeds: ``(N_images, D)`` float32 (``(0, D)`` when no images were embedded).
        image_keys: One key per image row (relative path or sample key).
        text_embeds: ``(N_texts, D)`` float32.
        text_keys: One key per text row (1-based line number of the texts file, or the data's key).
        metadata: JSON-serialisable provenance: ``checkpoint`` (its absolute path, which ``search`` reuses for
            the query's text tower), ``image_size``, ``normalize``, sources, skip counts, ...
    """

    image_embeds: np.ndarray
    image_keys: list[str]
    text_embeds: np.ndarray
    text_keys: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for modality in _MODALITIES:
            rows, keys = getattr(self, f"{modality}_embeds"), getattr(self, f"{modality}_keys")
            if rows.ndim != 2 or rows.shape[0] != len(keys):
                raise ValueError(
                    f"{modality}_embeds must be (N, D) with one key per row; got {rows.shape} and {len(keys)} keys."
                )
        if self.image_embeds.shape[1] != self.text_embeds.shape[1]:
            raise ValueError(
                f"Image and text embeddings differ in width: {self.image_embeds.shape[1]} vs "
                f"{self.text_embeds.shape[1]}."
            )

    @classmethod
    def from_rows(
        cls,
        image_embeds: Tensor | np.ndarray | None,
        image_keys: Sequence[str],
        text_embeds: Tensor | np.ndarray | None,
        text_keys: Sequence[str],
        metadata: dict[str, Any] | None = None,
    ) -> Embeddings:
        """Build from tensors or arrays; a missing modality (``None``) becomes an empty ``(0, D)`` array."""
        arrays = [None if x is None else _as_float32(x) for x in (image_embeds, text_embeds)]
        width = next((a.shape[1] for a in arrays if a is not None), None)
        if width is None:
            raise ValueError("Nothing to store: neither image nor text embeddings were given.")
        empty = np.zeros((0, width), dtype=np.float32)
        return cls(
            arrays[0] if arrays[0] is not None else empty,
            [str(k) for k in image_keys],
            arrays[1] if arrays[1] is not None else empty,
            [str(k) for k in text_keys],
            dict(metadata or {}),
        )

    @property
    def dim(self) -> int:
        """The embedding width ``D``."""
        return int(self.image_embeds.shape[1])

    def _header(self) -> dict[str, Any]:
        return {"format": _FORMAT, "version": _VERSION, "metadata": self.metadata}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to ``path`` in the format its suffix selects (see the module docstring); parents are created.

        Returns:
            The path written.

        Raises:
            ValueError, ImportError: As :func:`check_embeddings_path`.
        """
        path = check_embeddings_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = path.suffix.lower()
        if suffix == ".npy":
            np.save(path, np.concatenate([self.image_embeds, self.text_embeds]))
            sidecar = {**self._header(), "image_keys": self.image_keys, "text_keys": self.text_keys}
            _sidecar(path).write_text(json.dumps(sidecar, ensure_ascii=False) + "\n", encoding="utf-8")
        elif suffix == ".safetensors":
            from safetensors.numpy import save_file

            tensors = {
                f"{m}_embeds": np.ascontiguousarray(getattr(self, f"{m}_embeds"))
                for m in _MODALITIES
                if getattr(self, f"{m}_keys")
            }
            if not tensors:  # safetensors needs one tensor: keep the width in an empty image matrix
                tensors["image_embeds"] = self.image_embeds
            header = {
                "align_lightning": json.dumps(self._header(), ensure_ascii=False),
                "image_keys": json.dumps(self.image_keys, ensure_ascii=False),
                "text_keys": json.dumps(self.text_keys, ensure_ascii=False),
            }
            save_file(tensors, str(path), metadata=header)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            rows = np.concatenate([self.image_embeds, self.text_embeds])
            embedding = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), type=pa.float32()), self.dim)
            table = pa.table(
                {
                    "modality": ["image"] * len(self.image_keys) + ["text"] * len(self.text_keys),
                    "key": self.image_keys + self.text_keys,
                    "embedding": embedding,
                }
            )
            table = table.replace_schema_metadata({"align_lightning": json.dumps(self._header(), ensure_ascii=False)})
            pq.write_table(table, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], mmap: bool = False) -> Embeddings:
        """Read a file written by :meth:`save`.

        Args:
            path: The ``.npy`` (its ``.json`` sidecar beside it), ``.safetensors`` or ``.parquet`` file.
            mmap: Memory-map a ``.npy`` array instead of reading it (rows are read when used; other formats
                are read whole).

        Raises:
            FileNotFoundError: If the file (or a ``.npy``'s sidecar) is missing.
            ValueError: If it was not written by align_lightning (unknown layout), or has an unknown suffix.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in EMBEDDING_SUFFIXES:
            raise ValueError(
                f"{str(path)!r} is not an embeddings file: expected one of {', '.join(EMBEDDING_SUFFIXES)} "
                "(as written by `python -m align_lightning embed`)."
            )
        if not path.is_file():
            raise FileNotFoundError(
                f"Embeddings file {str(path)!r} not found: create it with `python -m align_lightning embed ... --out`."
            )
        try:
            if suffix == ".npy":
                return cls._load_npy(path, mmap)
            if suffix == ".safetensors":
                return cls._load_safetensors(path)
            return cls._load_parquet(path)
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(
                f"{path} does not hold align_lightning embeddings (missing or malformed {err}): write it with "
                "`python -m align_lightning embed` or EmbeddingWriter."
            ) from err

    @classmethod
    def _load_npy(cls, path: Path, mmap: bool) -> Embeddings:
        sidecar_path = _sidecar(path)
        if not sidecar_path.is_file():
            raise FileNotFoundError(
                f"{path} has no sidecar {sidecar_path.name} (its keys and metadata): keep the two files together."
            )
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
        _check_header(sidecar, path)
        rows = np.load(path, mmap_mode="r" if mmap else None)
        split = len(sidecar["image_keys"])
        return cls(rows[:split], sidecar["image_keys"], rows[split:], sidecar["text_keys"], sidecar["metadata"])

    @classmethod
    def _load_safetensors(cls, path: Path) -> Embeddings:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as file:
            header = file.metadata() or {}
            info = json.loads(header["align_lightning"])
            _check_header(info, path)
            stored = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 - not a dict
        width = next(iter(stored.values())).shape[1]
        empty = np.zeros((0, width), dtype=np.float32)
        image_keys, text_keys = json.loads(header["image_keys"]), json.loads(header["text_keys"])
        images = stored.get("image_embeds", empty) if image_keys else empty
        texts = stored.get("text_embeds", empty) if text_keys else empty
        return cls(images, image_keys, texts, text_keys, info["metadata"])

    @classmethod
    def _load_parquet(cls, path: Path) -> Embeddings:
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError(f"Reading {path} needs the 'pyarrow' package: pip install pyarrow.") from err
        table = pq.read_table(path)
        info = json.loads((table.schema.metadata or {})[b"align_lightning"])
        _check_header(info, path)
        modality = np.asarray(table.column("modality").to_pylist())
        keys = table.column("key").to_pylist()
        column = table.column("embedding").combine_chunks()
        width = column.type.list_size
        rows = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
        split = {m: np.flatnonzero(modality == m) for m in _MODALITIES}
        return cls(
            rows[split["image"]],
            [keys[i] for i in split["image"]],
            rows[split["text"]],
            [keys[i] for i in split["text"]],
            info["metadata"],
        )


def _check_header(info: dict[str, Any], path: Path) -> None:
    if info.get("format") != _FORMAT:
        raise ValueError(f"{path} was not written by align_lightning (format {info.get('format')!r}).")
    if int(info.get("version", 0)) > _VERSION:
        raise ValueError(
            f"{path} has embeddings format version {info['version']}, newer than this align_lightning reads "
            f"({_VERSION}): upgrade align_lightning."
        )


def gather_rows_on_rank_zero(
    rows: np.ndarray, keys: Sequence[str], order: np.ndarray, chunk_rows: int = 65_536
) -> tuple[np.ndarray, list[str]] | None:
    """Collect every rank's embedding rows on rank 0, sorted by their sort keys (a collective under DDP).

    Without an initialised process group (or with one process) this sorts the local rows. Rows travel
    ``chunk_rows`` at a time, so no rank serialises more than one chunk per rank at once.

    Args:
        rows: ``(n, D)`` float32 rows of this rank (``(0, 0)`` or ``(0, D)`` when it has none).
        keys: One key per row.
        order: ``(n, F)`` integer sort keys, the first column the most significant (e.g. the global index).
        chunk_rows: Rows per rank sent in one round.

    Returns:
        ``(rows, keys)`` of all ranks in sort-key order on rank 0; ``None`` on the other ranks.
    """
    parts = [(rows, list(keys), order)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world, rank = dist.get_world_size(), dist.get_rank()
        counts: list[Any] = [None] * world
        dist.all_gather_object(counts, len(keys))
        pieces: list[list[Any]] = [[] for _ in range(world)]
        for round_index in range(max(math.ceil(count / chunk_rows) for count in counts)):
            window = slice(round_index * chunk_rows, (round_index + 1) * chunk_rows)
            received: list[Any] | None = [None] * world if rank == 0 else None
            dist.gather_object((rows[window], list(keys[window]), order[window]), received, dst=0)
            for source, piece in enumerate(received or []):
                pieces[source].append(piece)
        if rank != 0:
            return None
        parts = [piece for own in pieces for piece in own]
    filled = [part for part in parts if part[1]]
    if not filled:
        return np.zeros((0, rows.shape[1] if rows.ndim == 2 else 0), dtype=np.float32), []
    all_rows = np.concatenate([part[0] for part in filled])
    all_keys = [key for part in filled for key in part[1]]
    permutation = np.lexsort(np.concatenate([part[2] for part in filled]).T[::-1])  # last row = primary key
    return all_rows[permutation], [all_keys[i] for i in permutation]


def _as_float32(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


@torch.no_grad()
def top_k(
    queries: Tensor,
    index: np.ndarray | Tensor,
    k: int,
    *,
    chunk_size: int = 65_536,
    backend: Literal["exact", "faiss"] = "exact",
) -> tuple[Tensor, Tensor]:
    """The ``k`` index rows most similar (dot product) to each query: exact, one chunk of the index at a time.

    The exact backend scores ``chunk_size`` index rows at a time and keeps a running top-k, so memory is
    ``O(Q x (chunk_size + k))`` whatever the index size, and a memory-mapped index is read chunk by chunk.
    Ties are broken by the lower row index.

    Args:
        queries: ``(Q, D)`` query embeddings; the computation runs on their device.
        index: ``(N, D)`` embeddings to search (a NumPy array, memory-mapped or not, or a tensor).
        k: Results per query (at most ``N`` are returned).
        chunk_size: Index rows scored at once (exact backend).
        backend: ``"exact"`` (chunked matrix products) or ``"faiss"`` (an exact ``IndexFlatIP``; needs faiss).

    Returns:
        ``(scores, indices)``, both ``(Q, min(k, N))``, best first.

    Raises:
        ValueError: For ``k`` or ``chunk_size`` below 1, mismatched widths, or an unknown backend.
        ImportError: For ``backend="faiss"`` without faiss installed.
    """
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k and chunk_size must be positive, got {k} and {chunk_size}.")
    if queries.ndim != 2 or index.ndim != 2 or queries.shape[1] != index.shape[1]:
        raise ValueError(f"Queries {tuple(queries.shape)} and index {tuple(index.shape)} must be (Q, D) and (N, D).")
    k = min(k, int(index.shape[0]))
    if backend == "faiss":
        return _faiss_top_k(queries, index, k)
    if backend != "exact":
        raise ValueError(f"backend must be 'exact' or 'faiss', got {backend!r}.")
    device = queries.device
    queries = queries.float()
    best_scores = torch.full((queries.shape[0], 0), float("-inf"), device=device)
    best_indices = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=device)
    for start in range(0, int(index.shape[0]), chunk_size):
        chunk = index[start : start + chunk_size]
        rows = chunk.to(device) if isinstance(chunk, Tensor) else torch.from_numpy(np.asarray(chunk)).to(device)
        scores = queries @ rows.float().T
        chunk_k = min(k, scores.shape[1])
        chunk_scores, chunk_indices = _stable_topk(scores, chunk_k)
        # Earlier chunks first, so that a stable re-selection keeps the lower row index among equal scores.
        merged_scores = torch.cat([best_scores, chunk_scores], dim=1)
        merged_indices = torch.cat([best_indices, chunk_indices + start], dim=1)
        keep_scores, keep = _stable_topk(merged_scores, min(k, merged_scores.shape[1]))
        best_scores, best_indices = keep_scores, merged_indices.gather(1, keep)
    return best_scores, best_indices


def _stable_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``topk`` that breaks ties by the lower column (``torch.topk`` leaves their order unspecified)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    return order.values[:, :k], order.indices[:, :k]


def _faiss_top_k(queries: Tensor, index: np.ndarray | Tensor, k: int) -> tuple[Tensor, Tensor]:
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "The faiss backend needs the 'faiss' package, which is not installed: pip install faiss-cpu "
            "(or faiss-gpu), or use the exact backend (the default)."
        ) from err
    rows = index.detach().float().cpu().numpy() if isinstance(index, Tensor) else np.asarray(index, np.float32)
    flat = faiss.IndexFlatIP(rows.shape[1])
    flat.add(np.ascontiguousarray(rows))
    scores, indices = flat.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
    return torch.from_numpy(scores).to(queries.device), torch.from_numpy(indices).long().to(queries.device)
