"""Lightning strategies preset for the dual encoder: FSDP2 (also on CPU) and FSDP1 (GPU).

Plain data parallelism needs nothing of ours: ``strategy: ddp`` (or ``ddp_spawn`` in notebooks).
For sharded training, two names are registered with Lightning when ``align_lightning`` is imported::

    # FSDP2 (torch.distributed.fsdp.fully_shard), GPUs or CPU (gloo):
    python -m align_lightning fit --config recipes/align_base.yaml --trainer.strategy fsdp2
    # FSDP1 (FullyShardedDataParallel) on the same units, GPUs:
    python -m align_lightning fit --config recipes/align_base.yaml --trainer.strategy fsdp_align

or, with settings, ``strategy: {class_path: align_lightning.strategies.FSDP2Strategy, init_args:
{param_dtype: bfloat16}}`` in a recipe. Both cut the model into the same units
(:mod:`align_lightning.model.sharding`): each EfficientNet block and BERT layer, then each tower,
then the projections and temperature.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout

from align_lightning.model.sharding import fsdp_unit_classes

__all__ = ["ALIGNFSDPStrategy", "FSDP2Strategy", "register_strategies"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DType = Literal["float32", "bfloat16", "float16"]


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism over every rank: Lightning's ``ModelParallelStrategy`` with a 1-D mesh.

    ``ModelParallelStrategy`` defaults to tensor parallelism inside a node; this preset makes every
    rank a data-parallel shard (tensor parallel size 1) and carries the ``fully_shard`` settings
    that :meth:`~align_lightning.ALIGNModule.configure_model` applies per block. Works on GPUs
    (NCCL) and on CPU (gloo). Use ``precision: 32-true`` with ``param_dtype: bfloat16`` for
    FSDP2's own mixed precision (bf16 parameters and compute, float32 gradient reduction), or
    ``precision: bf16-mixed`` for autocast over float32 parameters.

    Args:
        param_dtype: Dtype of the unsharded parameters used in forward/backward (``None``: as stored).
        reduce_dtype: Dtype of the gradient reduce-scatter (float32 by default, as the issue of
            summing many bf16 gradients demands).
        reshard_after_forward: Free the gathered parameters after each unit's forward (ZeRO-3;
            ``False``: keep them until backward, ZeRO-2-like, faster and larger).
        save_distributed_checkpoint: Save a sharded (distributed) checkpoint folder; ``False``
            gathers a full state dict into a single file on rank 0.
        process_group_backend: ``nccl`` / ``gloo``; default from the device.
        timeout: Collective timeout.
    """

    def __init__(
        self,
        param_dtype: DType | None = None,
        reduce_dtype: DType | None = "float32",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        """Every rank is a data-parallel shard."""
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def fully_shard_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of every ``fully_shard`` call (mixed precision, resharding)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(
            param_dtype=_DTYPES[self.param_dtype] if self.param_dtype else None,
            reduce_dtype=_DTYPES[self.reduce_dtype] if self.reduce_dtype else None,
        )
        return {"mp_policy": policy, "reshard_after_forward": self.reshard_after_forward}


class ALIGNFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (FSDP1, GPUs) wrapping each block, each tower, then the rest.

    The auto-wrap policy is built from the model when training starts
    (:func:`~align_lightning.model.sharding.fsdp_unit_classes`: EfficientNet blocks, BERT layers,
    the tower classes), and the same classes are activation-checkpointed when
    ``activation_checkpointing`` is on. ``use_orig_params=True`` (the default here) keeps parameter
    names and allows frozen and trainable parameters side by side; towers are units of their own
    either way, so ``freeze_image_tower`` / ``freeze_text_tower`` work.

    Args:
        activation_checkpointing: Recompute each unit's activations in backward.
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3), ``SHARD_GRAD_OP`` (ZeRO-2), ``HYBRID_SHARD``, ``NO_SHARD``.
        state_dict_type: ``"full"`` (one file, gathered on rank 0) or ``"sharded"`` (a folder).
        **kwargs: Anything else of Lightning's ``FSDPStrategy`` (``mixed_precision``, ``cpu_offload``, ...).
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        sharding_strategy: str = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "full",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("use_orig_params", True)
        super().__init__(sharding_strategy=sharding_strategy, state_dict_type=state_dict_type, **kwargs)
        self.activation_checkpointing = activation_checkpointing

    def setup(self, trainer: Any) -> None:
        """Set the wrap (and checkpointing) policy from the model's units, then wrap as Lightning does."""
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        classes = fsdp_unit_classes(trainer.lightning_module.model)
        self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(classes)
        if self.activation_checkpointing:
            self._activation_checkpointing_kwargs = {"auto_wrap_policy": ModuleWrapPolicy(classes - _tower_types())}
        super().setup(trainer)


def _tower_types() -> set[type]:
    from align_lightning.model.towers import ImageTower, TextTower

    return {ImageTower, TextTower}


def register_strategies() -> None:
    """Register ``fsdp2`` (:class:`FSDP2Strategy`) and ``fsdp_align`` (:class:`ALIGNFSDPStrategy`) with Lightning."""
    from lightning.pytorch.strategies import StrategyRegistry

    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register(
            "fsdp2", FSDP2Strategy, description="FSDP2 per block over all ranks (align_lightning)"
        )
    if "fsdp_align" not in StrategyRegistry:
        StrategyRegistry.register(
            "fsdp_align", ALIGNFSDPStrategy, description="FSDP1 wrapping each block and tower (align_lightning)"
        )


register_strategies()
