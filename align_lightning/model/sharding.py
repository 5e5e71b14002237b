"""How the dual encoder is cut into FSDP units: one unit per repeated block, then per tower, then the rest.

Both FSDP flavours use the same units:

* FSDP2 (``torch.distributed.fsdp.fully_shard``): :func:`apply_fsdp2`, called by
  :meth:`~align_lightning.ALIGNModule.configure_model` under
  :class:`~align_lightning.strategies.FSDP2Strategy` (or Lightning's ``ModelParallelStrategy``);
* FSDP1 (``FullyShardedDataParallel``): :func:`fsdp_unit_classes` gives the classes for
  Lightning's ``FSDPStrategy(auto_wrap_policy=...)``, used by
  :class:`~align_lightning.strategies.ALIGNFSDPStrategy`.

Each unit lies inside one tower (the towers are units themselves), so a frozen tower never shares
a unit with trainable parameters (FSDP1 cannot flatten mixed ``requires_grad`` without
``use_orig_params``); the root unit holds only the projections and the temperature.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["apply_fsdp2", "fsdp_unit_classes", "is_fsdp2_sharded", "shard_units"]


def shard_units(tower: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a tower, each its own FSDP unit (in forward order).

    * timm models: the blocks of ``model.blocks`` (EfficientNet: its MBConv / fused-MBConv blocks,
      55 for B7), or of ``model.stages``;
    * Hugging Face models: the modules named in ``_no_split_modules`` (BERT: ``BertEmbeddings`` and
      each ``BertLayer``);
    * anything else: none (the tower is one unit).

    Args:
        tower: An :class:`~align_lightning.model.ImageTower` / :class:`~align_lightning.model.TextTower`
            (their ``model``), or the underlying timm / transformers model.
    """
    model = getattr(tower, "model", tower)
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    if no_split:
        return [module for module in model.modules() if type(module).__name__ in no_split]
    for name in ("blocks", "stages"):
        container = getattr(model, name, None)
        if isinstance(container, nn.Module):
            units: list[nn.Module] = []
            for child in container.children():
                grandchildren = list(child.children()) if isinstance(child, nn.Sequential) else []
                units.extend(grandchildren or [child])
            return units
    return []


def fsdp_unit_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The module classes FSDP1 wraps for a :class:`~align_lightning.model.DualEncoder`: its towers' block
    classes and the tower classes themselves (for ``ModuleWrapPolicy`` / activation checkpointing)."""
    classes: set[type[nn.Module]] = set()
    for tower in (model.image_tower, model.text_tower):
        classes.update(type(unit) for unit in shard_units(tower))
        classes.add(type(tower))
    return classes


def is_fsdp2_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` has been applied to ``module``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def apply_fsdp2(model: nn.Module, mesh: Any, **fully_shard_kwargs: Any) -> nn.Module:
    """Shard a :class:`~align_lightning.model.DualEncoder` in place with FSDP2, unit by unit.

    Every block of :func:`shard_units`, then each tower, then the whole model becomes an FSDP unit
    on ``mesh``; ``encode_image`` / ``encode_text`` are registered as forward methods, so evaluation
    code can call them directly (the root's parameters, the projections, are then gathered as in
    ``forward``).

    Args:
        model: The dual encoder.
        mesh: The data-parallel device mesh (1-D).
        **fully_shard_kwargs: Passed to every ``fully_shard`` call (``mp_policy``,
            ``reshard_after_forward``, ``offload_policy``).

    Returns:
        The same model, sharded.
    """
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = fully_shard_kwargs.get("mp_policy")
    if policy is not None and policy.param_dtype not in (None, torch.float32):
        # BatchNorm keeps float32 parameters (its running statistics are float32 buffers, which the
        # policy does not cast): each one its own float32 unit; it takes the low-precision activations
        # as they are (mixed-dtype batch norm) and returns them in that dtype.
        norm_policy = MixedPrecisionPolicy(
            param_dtype=torch.float32, reduce_dtype=policy.reduce_dtype, cast_forward_inputs=False
        )
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                fully_shard(module, mesh=mesh, **{**fully_shard_kwargs, "mp_policy": norm_policy})
    for tower in (model.image_tower, model.text_tower):
        for unit in shard_units(tower):
            fully_shard(unit, mesh=mesh, **fully_shard_kwargs)
        fully_shard(tower, mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    for method in ("encode_image", "encode_text"):
        register_fsdp_forward_method(model, method)
    return model
