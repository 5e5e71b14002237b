"""Evaluation callbacks: zero-shot retrieval (Flickr30K, COCO, ...) and zero-shot classification (ImageNet, ...).

Each rank encodes its own disjoint share of the evaluation set on its device; the embeddings are
gathered once (with their global indices, so no sample is dropped or duplicated whatever the world
size), and the metrics are computed on the device in chunks. Every rank computes the same values,
so they are logged without a further reduction.

A callback evaluates one evaluation DataModule, found in one of three ways:

* given as ``datamodule``: the callback runs its own loop over that set's loaders, after each
  validation epoch (in ``fit`` and ``validate``), after ``test``, and every ``every_n_steps``
  training steps. Any number of callbacks, each on its own set, can watch one training run.
* left unset while the trainer's DataModule *is* such a set (``validate`` / ``test`` with an
  evaluation recipe, ``trainer.validate(model, datamodule=RetrievalDataModule(...))``): the
  trainer's own evaluation loop feeds the batches through the LightningModule, whose
  ``validation_step`` / ``test_step`` returns :func:`embed_batch`'s embeddings (as
  :class:`~align_lightning.ALIGNModule` does), and the callback collects them.
* left unset while the trainer's DataModule provides one (``retrieval_datamodule()`` /
  ``zeroshot_datamodule()``, as :class:`~align_lightning.data.DemoDataModule` does for the
  quickstart's held-out sets): as if given.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch import Tensor

from align_lightning.data.evaluation import RetrievalDataModule, ZeroShotDataModule
from align_lightning.eval.retrieval import retrieval_metrics
from align_lightning.eval.visualize import confusion_matrix_image, retrieval_examples_image
from align_lightning.eval.zeroshot import topk_accuracy, zeroshot_classifier

__all__ = ["EvaluationCallback", "RetrievalEvalCallback", "ZeroShotEvalCallback", "embed_batch", "gather_rows"]

logger = logging.getLogger(__name__)


def _encoder(pl_module: L.LightningModule) -> Any:
    """The object with ``encode_image`` / ``encode_text``: the module's ``model`` or the module itself."""
    for candidate in (getattr(pl_module, "model", None), pl_module):
        if candidate is not None and hasattr(candidate, "encode_image") and hasattr(candidate, "encode_text"):
            return candidate
    raise TypeError(
        f"{type(pl_module).__name__} has no encode_image/encode_text (nor a .model with them): evaluation "
        "callbacks need a dual encoder such as align_lightning.model.DualEncoder."
    )


def embed_batch(encoder: Any, batch: dict[str, Any]) -> dict[str, Tensor]:
    """Embed an evaluation batch: what a LightningModule's ``validation_step`` returns for evaluation sets.

    Args:
        encoder: An object with ``encode_image(pixel_values)`` and ``encode_text(input_ids, attention_mask)``.
        batch: An evaluation loader's batch: ``pixel_values`` and/or ``input_ids`` (+ ``attention_mask``),
            with ``index`` (global positions) and optionally ``target`` (class indices).

    Returns:
        ``image_embeds`` / ``text_embeds`` (float32) for what the batch holds, and its ``index`` and ``target``.
    """
    out: dict[str, Tensor] = {}
    if "pixel_values" in batch:
        out["image_embeds"] = encoder.encode_image(batch["pixel_values"]).float()
    if "input_ids" in batch:
        out["text_embeds"] = encoder.encode_text(batch["input_ids"], batch.get("attention_mask")).float()
    for key in ("index", "target"):
        if key in batch:
            out[key] = batch[key]
    return out


def gather_rows(rows: Tensor, index: Tensor) -> Tensor:
    """Gather every rank's ``rows`` (different counts allowed) and return them ordered by their global ``index``.

    Args:
        rows: ``(n_local, ...)`` values computed on this rank.
        index: ``(n_local,)`` global positions of those rows.

    Returns:
        ``(n_total, ...)`` rows, ``result[i]`` being the row whose index is ``i``.

    Raises:
        RuntimeError: If the gathered indices are not exactly ``0 .. n_total - 1`` once each.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        # A rank with nothing to evaluate (fewer items than ranks) does not know the row shape: ask.
        shapes: list[Any] = [None] * world
        dist.all_gather_object(shapes, tuple(rows.shape[1:]) if rows.shape[0] else None)
        known = next((shape for shape in shapes if shape is not None), None)
        if known is not None and rows.shape[0] == 0:
            rows = rows.new_zeros((0, *known))
        count = torch.tensor([rows.shape[0]], device=rows.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        sizes = [int(c.item()) for c in counts]
        longest = max(sizes)
        padded = rows.new_zeros((longest, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        padded_index = index.new_full((longest,), -1)
        padded_index[: index.shape[0]] = index
        all_rows = [torch.empty_like(padded) for _ in range(world)]
        all_index = [torch.empty_like(padded_index) for _ in range(world)]
        dist.all_gather(all_rows, padded)
        dist.all_gather(all_index, padded_index)
        rows = torch.cat([r[:n] for r, n in zip(all_rows, sizes, strict=True)])
        index = torch.cat([i[:n] for i, n in zip(all_index, sizes, strict=True)])
    order = torch.argsort(index)
    if not torch.equal(index[order], torch.arange(index.shape[0], device=index.device)):
        raise RuntimeError(
            "Evaluation shards overlap or leave gaps: the gathered indices are not 0..N-1 once each. Each rank must "
            "encode a disjoint share of the evaluation set (the evaluation DataModules do this)."
        )
    return rows[order]


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _cat(outputs: list[dict[str, Tensor]], key: str, device: torch.device, long: bool = False) -> Tensor:
    """Concatenate one key of the collected outputs (an empty share gives an empty tensor of the right kind)."""
    parts = [out[key] for out in outputs if key in out]
    if parts:
        return torch.cat(parts).to(device)
    return torch.empty(0, dtype=torch.long if long else torch.float32, device=device)


def _log_dir(trainer: L.Trainer) -> Path:
    """The run folder: the logger's, else the trainer's root folder."""
    log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
    return Path(log_dir if log_dir is not None else trainer.default_root_dir)


class EvaluationCallback(L.Callback):
    """Shared machinery of the evaluation callbacks: finding the set, scheduling, collecting, logging.

    Subclasses set :attr:`datamodule_type` and :attr:`provider` and implement :meth:`compute`.

    Args:
        datamodule: The evaluation set; ``None``: the trainer's DataModule when it is one, or the one
            it provides (see the module docstring).
        every_n_steps: Also evaluate every this many training steps (``None``: only with validation / test).
        progress: Show a progress bar on rank 0 while the callback runs its own loop (unless the
            trainer's progress bar is disabled).
    """

    #: The evaluation DataModule class this callback evaluates.
    datamodule_type: type = object
    #: Name of the method by which a training DataModule provides such a set.
    provider: str = ""

    def __init__(self, datamodule: Any = None, every_n_steps: int | None = None, progress: bool = True) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive number of steps or None, got {every_n_steps}.")
        self.datamodule = datamodule
        self.every_n_steps = every_n_steps
        self.progress = progress
        self._prepared: Any = None
        self._outputs: list[dict[str, Tensor]] = []

    # -- which set, and who drives the loop --------------------------------------------------------

    def evaluates_trainer_data(self, trainer: L.Trainer) -> bool:
        """Whether this callback evaluates the trainer's own DataModule through the trainer's loop."""
        data = trainer.datamodule
        if self.datamodule is not None:
            return self.datamodule is data
        return isinstance(data, self.datamodule_type)

    def _resolve(self, trainer: L.Trainer) -> Any:
        if self.datamodule is not None:
            return self.datamodule
        data = trainer.datamodule
        if isinstance(data, self.datamodule_type):
            return data
        provide = getattr(data, self.provider, None)
        if callable(provide):
            self.datamodule = provide()
            return self.datamodule
        raise ValueError(
            f"{type(self).__name__} has no evaluation set: pass `datamodule` (a {self.datamodule_type.__name__}), "
            f"or use it with a trainer DataModule that is one (or provides one via {self.provider}())."
        )

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        """The evaluation DataModule, set up, with a tokenizer where it needs one."""
        datamodule = self._resolve(trainer)
        if self._prepared is datamodule:
            return datamodule
        if getattr(datamodule, "tokenizer", "n/a") is None and hasattr(datamodule, "set_tokenizer"):
            tokenizer = _tokenizer(trainer, pl_module)
            if tokenizer is None:
                raise ValueError(
                    f"The evaluation set {datamodule.name!r} has no tokenizer, and neither the model (its checkpoint) "
                    "nor the training DataModule provides one: set its `tokenizer` (the text tower's tokenizer)."
                )
            datamodule.set_tokenizer(tokenizer)
        if datamodule is not trainer.datamodule:
            datamodule.trainer = trainer  # rank and world size for the loaders' sharding
            datamodule.setup("validate")
        self._prepared = datamodule
        return datamodule

    @property
    def name(self) -> str:
        """The data set's name in metric keys (once the set is known)."""
        return str(getattr(self.datamodule, "name", type(self).__name__))

    def _batches(
        self, loader: Iterable[dict[str, Any]], trainer: L.Trainer, name: str, what: str
    ) -> Iterable[dict[str, Any]]:
        if not (self.progress and trainer.is_global_zero and trainer.progress_bar_callback is not None):
            return loader
        from tqdm.auto import tqdm

        return tqdm(loader, desc=f"{name}: {what}", leave=False)

    def _own_loop(self, trainer: L.Trainer, pl_module: L.LightningModule, datamodule: Any) -> list[dict[str, Tensor]]:
        encoder, device = _encoder(pl_module), pl_module.device
        # FSDP1 gathers the root unit's parameters (projections, temperature) only in the root's forward:
        # go through the strategy's validation_step (ALIGNModule embeds batches that carry an index).
        through_step = isinstance(trainer.strategy, FSDPStrategy)
        outputs = []
        for what, loader in self.loaders(datamodule):
            for batch in self._batches(loader, trainer, datamodule.name, what):
                batch = _to_device(batch, device)
                out = trainer.strategy.validation_step(batch, 0) if through_step else embed_batch(encoder, batch)
                if not isinstance(out, dict) or not ({"image_embeds", "text_embeds"} & set(out)):
                    raise TypeError(
                        f"Under FSDP, {type(pl_module).__name__}.validation_step must return embed_batch(...) for "
                        "evaluation batches (batches with an 'index'), as ALIGNModule does."
                    )
                outputs.append(out)
        return outputs

    # -- running -----------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, float]:
        """Evaluate now (own loop, or the embeddings the trainer's loop produced) and log ``{stage}/{name}/<metric>``.

        Returns:
            The logged metrics.
        """
        datamodule = self._prepare(trainer, pl_module)
        was_training = pl_module.training
        pl_module.eval()
        device = pl_module.device
        # Evaluating must not change training: loaders draw their seeds from the global generator.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            try:
                if self.evaluates_trainer_data(trainer):
                    outputs, self._outputs = self._outputs, []
                else:
                    outputs = self._own_loop(trainer, pl_module, datamodule)
                metrics = self.compute(trainer, pl_module, datamodule, outputs, stage)
            finally:
                pl_module.train(was_training)
        logged = {f"{stage}/{datamodule.name}/{key}": value for key, value in metrics.items()}
        for key, value in logged.items():
            pl_module.log(key, value, rank_zero_only=True, batch_size=1)
        if not trainer.sanity_checking:
            summary = ", ".join(f"{key.rsplit('/', 1)[1]} {value:.4f}" for key, value in logged.items())
            rank_zero_info(f"{stage}/{datamodule.name} at step {trainer.global_step}: {summary}")
        return logged

    def loaders(self, datamodule: Any) -> list[tuple[str, Iterable[dict[str, Any]]]]:  # pragma: no cover
        """``(what, loader)`` pairs of the set, for the callback's own loop."""
        raise NotImplementedError

    def compute(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        datamodule: Any,
        outputs: list[dict[str, Tensor]],
        stage: str,
    ) -> dict[str, float]:  # pragma: no cover
        """Metrics from this rank's embeddings (every rank calls it; every rank gets the same values)."""
        raise NotImplementedError

    def _save_figure(self, trainer: L.Trainer, image: Image.Image, stage: str, datamodule: Any, what: str) -> None:
        """Write ``image`` to ``<log_dir>/figures/`` and to TensorBoard (when it is a logger); rank 0 only."""
        folder = _log_dir(trainer)
        if not trainer.is_global_zero:
            return
        path = folder / "figures" / f"{stage}_{datamodule.name}_{what}_step{trainer.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        for run_logger in trainer.loggers:
            if isinstance(run_logger, TensorBoardLogger):
                import numpy as np

                run_logger.experiment.add_image(
                    f"{stage}/{datamodule.name}/{what}", np.asarray(image), trainer.global_step, dataformats="HWC"
                )
        logger.info("Wrote %s", path)

    # -- hooks ---------------------------------------------------------------------------------------

    def _collect(self, trainer: L.Trainer, outputs: Any) -> None:
        if self.evaluates_trainer_data(trainer) and isinstance(outputs, dict):
            self._outputs.append({k: v.detach() for k, v in outputs.items() if isinstance(v, Tensor)})

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start collecting the trainer loop's embeddings (when it evaluates the trainer's data)."""
        self._outputs = []

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Collect the validation / test step's embeddings when this callback evaluates the trainer's data."""
        self._collect(trainer, outputs)

    on_test_batch_end = on_validation_batch_end

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After each validation (in ``fit`` and ``validate``); not during the sanity check."""
        if not trainer.sanity_checking:
            self.run(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After ``test``."""
        self.run(trainer, pl_module, "test")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Every ``every_n_steps`` optimizer steps, logged under ``val/``."""
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self.run(trainer, pl_module, "val")


def _tokenizer(trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
    """The text tower's tokenizer: the model's (restored from its checkpoint), else the trainer DataModule's."""
    tokenizer = getattr(pl_module, "tokenizer", None)
    if tokenizer is None and trainer.datamodule is not None:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
    return tokenizer


class RetrievalEvalCallback(EvaluationCallback):
    """Zero-shot image-text retrieval recall@K (and median rank) on a Karpathy-split evaluation set.

    Logs ``{stage}/{name}/i2t_R@{k}`` and ``t2i_R@{k}`` (the DESIGN.md contract keys), plus
    ``i2t_median_rank`` / ``t2i_median_rank``. With ``examples``, also writes a picture of that
    many caption queries with their top-5 images (the right image framed green, others red) to
    ``<log_dir>/figures/`` and to TensorBoard when it is a logger.

    Args:
        datamodule: A :class:`~align_lightning.data.RetrievalDataModule`; ``None``: see the module docstring.
        ks: The K of recall@K.
        every_n_steps: Also evaluate every this many training steps (``None``: only with validation / test).
        chunk_size: Images scored against all captions at once (bounds the memory of the metric computation).
        examples: Caption queries in the retrieval-examples picture (0: no picture).
        progress: Show a progress bar on rank 0.
    """

    datamodule_type = RetrievalDataModule
    provider = "retrieval_datamodule"

    def __init__(
        self,
        datamodule: RetrievalDataModule | None = None,
        ks: Sequence[int] = (1, 5, 10),
        every_n_steps: int | None = None,
        chunk_size: int = 1024,
        examples: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__(datamodule, every_n_steps, progress)
        if examples < 0:
            raise ValueError(f"examples must be >= 0, got {examples}.")
        self.ks = tuple(ks)
        self.chunk_size = chunk_size
        self.examples = examples

    def loaders(self, datamodule: Any) -> list[tuple[str, Iterable[dict[str, Any]]]]:
        """The image loader and the caption loader."""
        return [("images", datamodule.image_dataloader()), ("captions", datamodule.text_dataloader())]

    def compute(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        datamodule: Any,
        outputs: list[dict[str, Tensor]],
        stage: str,
    ) -> dict[str, float]:
        """Gather the images' and captions' embeddings in order, compute recall@K (and draw the examples)."""
        device = pl_module.device
        image_outputs = [out for out in outputs if "image_embeds" in out]
        text_outputs = [out for out in outputs if "text_embeds" in out]
        images = gather_rows(_cat(image_outputs, "image_embeds", device), _cat(image_outputs, "index", device, True))
        texts = gather_rows(_cat(text_outputs, "text_embeds", device), _cat(text_outputs, "index", device, True))
        text_to_image = torch.as_tensor(datamodule.text_to_image, device=device)
        if images.shape[0] != len(datamodule.images) or texts.shape[0] != text_to_image.shape[0]:
            raise RuntimeError(
                f"{datamodule.name}: embedded {images.shape[0]} images and {texts.shape[0]} captions of "
                f"{len(datamodule.images)} and {text_to_image.shape[0]}; the evaluation loop must not be limited "
                "(limit_val_batches / limit_test_batches) on an evaluation set."
            )
        metrics = retrieval_metrics(
            images, texts, text_to_image, ks=self.ks, chunk_size=self.chunk_size, median_rank=True
        )
        if self.examples and not trainer.sanity_checking:
            queries = torch.linspace(0, texts.shape[0] - 1, min(self.examples, texts.shape[0])).round().long()
            top = (texts[queries.to(device)] @ images.T).topk(min(5, images.shape[0]), dim=1).indices.tolist()
            owners = text_to_image[queries.to(device)].tolist()
            picture = retrieval_examples_image(
                [datamodule.captions[q] for q in queries.tolist()],
                [[datamodule.images[i] for i in row] for row in top],
                [[owner == i for i in row] for owner, row in zip(owners, top, strict=True)],
            )
            self._save_figure(trainer, picture, stage, datamodule, "retrieval_examples")
        return metrics


class ZeroShotEvalCallback(EvaluationCallback):
    """Zero-shot classification top-1 / top-5 accuracy on an ImageFolder evaluation set (ImageNet, ...).

    The class embeddings (mean over the prompt templates of the normalised text embeddings,
    re-normalised) are computed once per evaluation run, not per batch. Logs
    ``{stage}/{name}/top1`` and ``top5``. With ``confusion_matrix``, also writes the confusion
    matrix (rows: true class, columns: predicted; row-normalised) as a picture to
    ``<log_dir>/figures/`` and to TensorBoard when it is a logger.

    Args:
        datamodule: A :class:`~align_lightning.data.ZeroShotDataModule`; ``None``: see the module docstring.
        ks: The k of top-k accuracy.
        every_n_steps: Also evaluate every this many training steps.
        tokenizer: The text tower's tokenizer (a tokenizer, hub name or folder); default: the model's
            (from its checkpoint), else the training DataModule's.
        text_batch_size: Prompts encoded at once.
        classifier_cache: File caching the class embeddings across runs of the *same* model (for
            repeated ``validate`` / ``test`` of one checkpoint; do not use while training).
        confusion_matrix: Draw the confusion matrix.
        progress: Show a progress bar on rank 0.
    """

    datamodule_type = ZeroShotDataModule
    provider = "zeroshot_datamodule"

    def __init__(
        self,
        datamodule: ZeroShotDataModule | None = None,
        ks: Sequence[int] = (1, 5),
        every_n_steps: int | None = None,
        tokenizer: Any = None,
        text_batch_size: int = 256,
        classifier_cache: str | None = None,
        confusion_matrix: bool = False,
        progress: bool = True,
    ) -> None:
        super().__init__(datamodule, every_n_steps, progress)
        self.ks = tuple(ks)
        self.tokenizer = tokenizer
        self.text_batch_size = text_batch_size
        self.classifier_cache = classifier_cache
        self.confusion_matrix = confusion_matrix

    def loaders(self, datamodule: Any) -> list[tuple[str, Iterable[dict[str, Any]]]]:
        """The image loader."""
        return [("images", datamodule.image_dataloader())]

    def compute(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        datamodule: Any,
        outputs: list[dict[str, Tensor]],
        stage: str,
    ) -> dict[str, float]:
        """Build the classifier, gather the image embeddings in order, compute top-k accuracy."""
        tokenizer = self.tokenizer or _tokenizer(trainer, pl_module)
        if tokenizer is None:
            raise ValueError(
                f"ZeroShotEvalCallback({datamodule.name!r}) needs the text tower's tokenizer: pass `tokenizer`, or "
                "use a model checkpoint or a training DataModule that carries one."
            )
        if isinstance(tokenizer, str):
            from align_lightning.data.tokenizer import load_tokenizer

            tokenizer = self.tokenizer = load_tokenizer(tokenizer)
        encoder, device = _encoder(pl_module), pl_module.device
        classifier = zeroshot_classifier(
            encoder,
            list(datamodule.classnames),
            list(datamodule.templates),
            tokenizer,
            batch_size=self.text_batch_size,
            device=device,
            cache_path=self.classifier_cache,
        )
        index = _cat(outputs, "index", device, long=True)
        images = gather_rows(_cat(outputs, "image_embeds", device), index)
        targets = gather_rows(_cat(outputs, "target", device, long=True), index)
        if images.shape[0] != len(datamodule.images):
            raise RuntimeError(
                f"{datamodule.name}: embedded {images.shape[0]} of {len(datamodule.images)} images; the evaluation "
                "loop must not be limited (limit_val_batches / limit_test_batches) on an evaluation set."
            )
        scores = images @ classifier.to(device).float()
        if self.confusion_matrix and not trainer.sanity_checking:
            classes = len(datamodule.classnames)
            counts = torch.bincount(targets * classes + scores.argmax(dim=1), minlength=classes * classes)
            picture = confusion_matrix_image(counts.reshape(classes, classes).cpu(), list(datamodule.classnames))
            self._save_figure(trainer, picture, stage, datamodule, "confusion_matrix")
        return topk_accuracy(scores, targets, ks=self.ks)
