"""FSDP2 sharding of the recipe models (used by ``CausalLMModule.configure_model`` under
``ModelParallelStrategy``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lightning_nexus_recipes.models import RecipeModel


def shard_model(
    model: RecipeModel,
    mesh: torch.distributed.device_mesh.DeviceMesh,
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> RecipeModel:
    """``fully_shard`` each transformer block, then the root (embeddings, final norm, head).

    One FSDP unit per block lets the all-gather of block i+1 overlap the compute of block i, and keeps
    only one unsharded block alive at a time. With ``param_dtype`` (bf16 under ``bf16-mixed``) the
    all-gathers move half the bytes; gradients are still reduced and kept in fp32, next to the fp32
    sharded master weights that NexusCallback and the optimizer update.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = (
        MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        if param_dtype
        else MixedPrecisionPolicy()
    )
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    # The root's parameters are needed again right after forward (the head in the loss): keep them.
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    return model
