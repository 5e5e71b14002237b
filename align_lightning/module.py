"""The LightningModule that trains a :class:`~align_lightning.model.DualEncoder` with a contrastive loss."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from transformers import PreTrainedTokenizerBase

from align_lightning._errors import ConfigError
from align_lightning.data.tokenizer import tokenizer_from_files, tokenizer_to_files
from align_lightning.eval.callbacks import EvaluationCallback, embed_batch
from align_lightning.eval.retrieval import retrieval_metrics
from align_lightning.grad_cache import GradCache
from align_lightning.losses.contrastive import ContrastiveLoss
from align_lightning.model.dual_encoder import DualEncoder
from align_lightning.model.sharding import apply_fsdp2, is_fsdp2_sharded
from align_lightning.optim import WarmupLinearDecay, align_lamb, weight_decay_param_groups
from align_lightning.strategies import register_strategies

register_strategies()  # Trainer(strategy="fsdp2" | "fsdp_align")

__all__ = ["ALIGNModule"]


def _built_by_cli() -> bool:
    """Whether LightningCLI is instantiating this module with its config as hyper-parameters."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # a Lightning without the mechanism: behave as when built in Python
        return False
    return _given_hyperparameters.get() is not None


class ALIGNModule(L.LightningModule):
    """Orchestrates ALIGN training: the model embeds, the loss scores, this module steps and logs.

    Everything is injected (a recipe wires it with ``class_path``/``init_args``): the dual encoder,
    the loss, an optimizer factory and a learning-rate scheduler factory. Weight decay is applied
    to matrices only: biases, norm weights and the temperature are excluded (ALIGN), by giving the
    optimizer two parameter groups.

    Logged: ``train/loss`` (+ ``train/loss_i2t``, ``train/loss_t2i``), ``train/temperature``,
    ``train/lr``, ``train/samples_per_sec`` (global); ``val/loss`` and held-out retrieval recall
    ``val/<dataset>/i2t_R@k`` / ``t2i_R@k`` over the whole validation set (``test/...`` likewise).

    Validation / test batches of image-text pairs give the loss and that recall; batches of an
    evaluation set (with an ``index``: :class:`~align_lightning.data.RetrievalDataModule`,
    :class:`~align_lightning.data.ZeroShotDataModule`) are embedded and returned, for the
    evaluation callback that computes their metrics (``validate`` / ``test`` with an evaluation
    recipe).

    The text tower's tokenizer (:attr:`tokenizer`, taken from the DataModule) is saved in every
    checkpoint and restored with it, so a checkpoint is evaluated or used without the training data.

    Args:
        model: The dual encoder.
        loss: The contrastive loss; default ALIGN's (label smoothing 0.1, negatives from all ranks).
        optimizer: Callable mapping parameter groups to an optimizer; default LAMB, lr 1e-3, weight
            decay 1e-5.
        lr_scheduler: Callable mapping the optimizer to a scheduler, stepped every optimizer step;
            default linear decay to 0 over the run (use :class:`WarmupLinearDecay` for warm-up).
        retrieval_ks: The K of the held-out recall@K.
        compile_towers: ``torch.compile`` each tower (``True``: the default inductor backend, or a
            backend name). Applied after FSDP2 sharding; where compilation is not supported (no
            compiler toolchain, an unsupported platform) a warning is logged and the towers run eagerly.
        micro_batch_size: Contrastive gradient caching (:class:`~align_lightning.grad_cache.GradCache`):
            train on each batch in micro-batches of this many pairs, with the loss and its negatives
            over the whole batch (of all ranks) and the memory of one micro-batch, for one extra
            forward pass. The gradients are those of the whole batch (BatchNorm statistics per
            micro-batch). ``None`` (default): the batch in one pass. Composes with DDP, FSDP2, mixed
            precision, activation checkpointing, gradient clipping and accumulation; not with FSDP1.

    Raises:
        ConfigError: If ``micro_batch_size`` is not positive.
    """

    def __init__(
        self,
        model: DualEncoder,
        loss: ContrastiveLoss | None = None,
        optimizer: OptimizerCallable = align_lamb,
        lr_scheduler: LRSchedulerCallable = WarmupLinearDecay,
        retrieval_ks: tuple[int, ...] = (1, 5, 10),
        compile_towers: bool | str = False,
        micro_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        # Built by LightningCLI, the hyper-parameters are the recipe's config (modules included as
        # class_path/init_args), so `ALIGNModule.load_from_checkpoint(path)` rebuilds everything.
        # Built in Python, the modules and factories are not pickled into them (weights are in the
        # state dict; a pickled functools.partial would make the checkpoint unloadable with
        # weights_only=True, as distributed checkpoints are read): pass `model=` (and `loss=`) to
        # `load_from_checkpoint`.
        self.save_hyperparameters(ignore=[] if _built_by_cli() else ["model", "loss", "optimizer", "lr_scheduler"])
        self.model = model
        self.loss = loss if loss is not None else ContrastiveLoss()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.retrieval_ks = tuple(retrieval_ks)
        self.compile_towers = compile_towers
        self._towers_compiled = False
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ConfigError("micro_batch_size", micro_batch_size, "must be a positive number of pairs, or null.")
        self.micro_batch_size = micro_batch_size
        self._grads_cached = False
        self._eval_embeds: list[tuple[Tensor, Tensor]] = []
        self._last_step_time: float | None = None
        #: The text tower's tokenizer: the DataModule's, or the one restored from a checkpoint.
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._tokenizer_files: tuple[int, dict[str, str]] | None = None

    # -- tokenizer and checkpoints -----------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Adopt the DataModule's tokenizer (a checkpoint's, restored later, takes precedence)."""
        datamodule = self.trainer.datamodule
        if self.tokenizer is None and datamodule is not None:
            self.tokenizer = getattr(datamodule, "tokenizer", None)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the tokenizer's files with the weights."""
        if self.tokenizer is None:
            return
        if self._tokenizer_files is None or self._tokenizer_files[0] != id(self.tokenizer):
            self._tokenizer_files = (id(self.tokenizer), tokenizer_to_files(self.tokenizer))
        checkpoint["tokenizer"] = self._tokenizer_files[1]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the tokenizer saved with the weights."""
        files = checkpoint.get("tokenizer")
        if files:
            self.tokenizer = tokenizer_from_files(files)
            self._tokenizer_files = (id(self.tokenizer), dict(files))

    def configure_model(self) -> None:
        """Shard the dual encoder with FSDP2 when the strategy provides a device mesh, then compile the
        towers if ``compile_towers`` (each at most once).

        Under :class:`~align_lightning.strategies.FSDP2Strategy` (or Lightning's
        ``ModelParallelStrategy`` with tensor parallel size 1), each EfficientNet block and BERT
        layer, each tower, then the whole encoder become ``fully_shard`` units on the
        data-parallel mesh, with the strategy's mixed-precision policy.
        """
        mesh = self.device_mesh
        if mesh is None or is_fsdp2_sharded(self.model):
            self._compile_towers()
            return
        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "Tensor parallelism is not supported for the dual encoder: use "
                "align_lightning.strategies.FSDP2Strategy (every rank a data-parallel shard)."
            )
        data_parallel = mesh["data_parallel"] if "data_parallel" in names else mesh
        fully_shard_kwargs = getattr(self.trainer.strategy, "fully_shard_kwargs", dict)()
        apply_fsdp2(self.model, data_parallel, **fully_shard_kwargs)
        self._compile_towers()

    def _compile_towers(self) -> None:
        """``torch.compile`` the towers in place (once), or warn and stay eager where it cannot work."""
        if not self.compile_towers or self._towers_compiled:
            return
        self._towers_compiled = True
        backend = "inductor" if self.compile_towers is True else str(self.compile_towers)
        try:  # compile and run a tiny function first: a missing toolchain fails here, not mid-training
            torch.compile(lambda x: x * 2 + 1, backend=backend)(torch.ones(2, device=self.device))
        except Exception as err:  # noqa: BLE001 - any failure means: run eagerly
            rank_zero_warn(f"torch.compile(backend={backend!r}) is not available here ({err!r}): towers run eagerly.")
            return
        self.model.image_tower.compile(backend=backend)
        self.model.text_tower.compile(backend=backend)

    # -- training --------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Embed a batch: ``(image_embeds, text_embeds, logit_scale)``."""
        return self.model(batch["pixel_values"], batch["input_ids"], batch.get("attention_mask"))

    def _step_loss(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        image_embeds, text_embeds, logit_scale = self(batch)
        return self.loss(image_embeds, text_embeds, logit_scale), image_embeds, text_embeds, logit_scale

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """One contrastive step on a batch of ``pixel_values``, ``input_ids``, ``attention_mask``."""
        batch_size = batch["input_ids"].shape[0]
        if self.micro_batch_size is not None and batch_size > self.micro_batch_size:
            terms, to_backward, logit_scale = self._grad_cache_step(batch, batch_idx)
        else:
            terms, _, _, logit_scale = self._step_loss(batch)
            to_backward = terms["loss"]
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=batch_size)
        self.log_dict({"train/loss_i2t": terms["loss_i2t"], "train/loss_t2i": terms["loss_t2i"]}, batch_size=batch_size)
        # The temperature the forward pass used (under FSDP the parameter is a shard outside forward).
        temperature = 1.0 / logit_scale.detach().float()
        self.log("train/temperature", temperature, prog_bar=True, batch_size=batch_size)
        return to_backward

    # -- gradient caching ------------------------------------------------------------------------

    def _grad_cache_step(self, batch: dict[str, Tensor], batch_idx: int) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Embed, score and back-propagate all micro-batches but the last; Lightning back-propagates the last.

        The earlier micro-batches' gradients are accumulated into ``.grad`` here, inside the training
        step, so Lightning's ``zero_grad`` (which it calls after the training step, before its backward)
        is done at the start of the step instead (:meth:`optimizer_zero_grad`). Their backward passes do
        not synchronise gradients: under DDP the reducer only acts on the backward after the training
        step, and FSDP2's gradient sync is switched off for them; the last backward synchronises the sum.
        """
        trainer = self.trainer
        if batch_idx % trainer.accumulate_grad_batches == 0:  # the first batch of an optimizer step
            for optimizer in trainer.optimizers:
                optimizer.zero_grad()
            self._grads_cached = True
        scaler = getattr(trainer.strategy.precision_plugin, "scaler", None)
        divisor = trainer.accumulate_grad_batches  # Lightning divides the returned loss likewise

        def backward(surrogate: Tensor) -> None:
            surrogate = surrogate / divisor
            if scaler is not None:
                surrogate = scaler.scale(surrogate)
            with self._gradient_sync_disabled():
                surrogate.backward()

        cache = GradCache(self, self.loss, self.micro_batch_size, modules=self.model)
        return cache.step(batch, backward, device=self.device)

    @contextmanager
    def _gradient_sync_disabled(self) -> Iterator[None]:
        """FSDP2: accumulate unsharded gradients without reduce-scatter (restored afterwards)."""
        if not is_fsdp2_sharded(self.model):
            yield
            return
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Optimizer) -> None:
        """Zero the gradients, unless gradient caching already did at the start of this step (the step's
        earlier micro-batches are in them)."""
        if self._grads_cached:
            self._grads_cached = False
            return
        optimizer.zero_grad()

    def on_fit_start(self) -> None:
        """Refuse gradient caching under FSDP1, whose wrapped forward cannot run backward passes inside."""
        if self.micro_batch_size is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            strategy = type(self.trainer.strategy).__name__
            raise ValueError(
                f"micro_batch_size (gradient caching) is not supported under FSDP1 ({strategy}): use "
                "--trainer.strategy fsdp2 (FSDP2) or ddp."
            )
        if self.micro_batch_size is not None and not self.automatic_optimization:
            raise ValueError("micro_batch_size (gradient caching) needs automatic optimization.")

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Log the learning rate and the global throughput (samples/s over all ranks)."""
        now = time.perf_counter()
        if self._last_step_time is not None:
            samples = batch["input_ids"].shape[0] * self.trainer.world_size
            self.log("train/samples_per_sec", samples / (now - self._last_step_time), batch_size=1)
        self._last_step_time = now
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)

    def on_train_epoch_start(self) -> None:
        """Do not count the gap between epochs (validation, checkpointing) as step time."""
        self._last_step_time = None

    def configure_optimizers(self) -> dict[str, Any]:
        """Build the optimizer on the two weight-decay groups and a per-step scheduler."""
        optimizer = self.optimizer(weight_decay_param_groups(self.model))
        scheduler = self.lr_scheduler(optimizer)
        if isinstance(scheduler, WarmupLinearDecay) and scheduler.total_steps is None:
            total = self.trainer.estimated_stepping_batches
            # Lightning answers inf, or max_steps (-1 when unset), for data without a length.
            if not math.isfinite(total) or total < 1:
                total = self._estimated_steps_from_data()
            scheduler.total_steps = int(total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _estimated_steps_from_data(self) -> int:
        """Optimizer steps of the run from a streaming DataModule's own epoch estimate."""
        trainer = self.trainer
        estimate = getattr(trainer.datamodule, "estimated_batches_per_epoch", None)
        batches = estimate() if callable(estimate) else None
        if batches is None or trainer.max_epochs is None or trainer.max_epochs < 0:
            raise ValueError(
                "The learning-rate schedule needs the run's length, but the training data is a stream of unknown "
                "length. Set trainer.max_steps, or the DataModule's samples_per_epoch (WebDataModule), or "
                "lr_scheduler.init_args.total_steps."
            )
        steps = math.ceil(batches / trainer.accumulate_grad_batches) * trainer.max_epochs
        return steps if trainer.max_steps < 0 else min(steps, trainer.max_steps)

    # -- evaluation ------------------------------------------------------------------------------

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> None:
        terms, image_embeds, text_embeds, _ = self._step_loss(batch)
        self.log(f"{stage}/loss", terms["loss"], sync_dist=True, batch_size=batch["input_ids"].shape[0])
        self._eval_embeds.append((image_embeds.detach().float(), text_embeds.detach().float()))

    def _eval_epoch_end(self, stage: str) -> None:
        if not self._eval_embeds:
            return
        images = torch.cat([i for i, _ in self._eval_embeds])
        texts = torch.cat([t for _, t in self._eval_embeds])
        self._eval_embeds.clear()
        if self.trainer.world_size > 1:
            images = self.all_gather(images).flatten(0, 1)
            texts = self.all_gather(texts).flatten(0, 1)
        # One caption per image here: caption j describes image j.
        metrics = retrieval_metrics(images, texts, torch.arange(len(texts)), ks=self.retrieval_ks)
        name = getattr(self.trainer.datamodule, "name", None) or "data"
        self.log_dict({f"{stage}/{name}/{key}": value for key, value in metrics.items()}, rank_zero_only=True)
        if not self.trainer.sanity_checking:
            # Chance level of R@K with one caption per image is K / N: say how far above it we are.
            summary = ", ".join(
                f"{key} {value:.3f} (chance {min(int(key.rsplit('@', 1)[1]) / len(texts), 1.0):.3f})"
                for key, value in metrics.items()
            )
            rank_zero_info(f"{stage}/{name} retrieval, {len(texts)} held-out pairs, step {self.global_step}: {summary}")

    def _check_evaluated(self) -> None:
        """An evaluation set as the trainer's data needs the callback that turns its embeddings into metrics."""
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "image_dataloader"):
            return
        callbacks = self.trainer.callbacks
        if not any(isinstance(cb, EvaluationCallback) and cb.evaluates_trainer_data(self.trainer) for cb in callbacks):
            kind = "ZeroShotEvalCallback" if hasattr(datamodule, "classnames") else "RetrievalEvalCallback"
            raise ValueError(
                f"The data is the evaluation set {getattr(datamodule, 'name', '?')!r}, but no callback evaluates it: "
                f"add align_lightning.eval.{kind} to trainer.callbacks (as recipes/eval_*.yaml do)."
            )

    def on_validation_epoch_start(self) -> None:
        """Start collecting validation embeddings."""
        self._eval_embeds.clear()
        self._check_evaluated()

    def validation_step(
        self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor] | None:
        """Validation loss on a held-out pair batch (embeddings kept for the epoch's recall); an evaluation
        set's batch is embedded and returned for its callback."""
        if "index" in batch:
            return embed_batch(self.model, batch)
        self._eval_step(batch, "val")
        return None

    def on_validation_epoch_end(self) -> None:
        """Retrieval recall@K over the whole validation set."""
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        """Start collecting test embeddings."""
        self._eval_embeds.clear()
        self._check_evaluated()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor] | None:
        """Test loss on a held-out pair batch; an evaluation set's batch is embedded and returned."""
        if "index" in batch:
            return embed_batch(self.model, batch)
        self._eval_step(batch, "test")
        return None

    def on_test_epoch_end(self) -> None:
        """Retrieval recall@K over the whole test set."""
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Embed whatever the batch holds: ``image_embeds`` for ``pixel_values``, ``text_embeds`` for
        ``input_ids`` (plus the batch's ``index`` / ``target`` when it has them)."""
        return embed_batch(self.model, batch)
