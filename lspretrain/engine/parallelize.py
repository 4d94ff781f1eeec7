"""Apply distribution to a method from outside, torchtitan style.

``parallelize(method, cfg, mesh)`` transforms the method in this order, each step on the
blocks of ``method.sharded_modules()``:

1. activation checkpointing (``full``: every block; ``selective``: every ``ac_every``-th block),
2. ``torch.compile`` of each block,
3. data parallelism: ``fsdp2`` = ``fully_shard`` on each block, then on the root (the method,
   which gathers heads, embeddings and final norms); ``ddp`` = a ``DistributedDataParallel``
   wrapper; otherwise nothing.

Checkpointing and compilation replace a block's ``forward`` / call path in place instead of
wrapping the block, so parameter names (optimizer groups, checkpoints) never change with them.
The model files know nothing of any of this.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.checkpoint import checkpoint

from .config import StrategyConfig

__all__ = ["parallelize", "apply_activation_checkpointing", "apply_compile", "apply_fsdp2"]


def _blocks(method: nn.Module) -> list[nn.Module]:
    return [blk for backbone in method.sharded_modules() for blk in backbone.blocks]


def apply_activation_checkpointing(method: nn.Module, mode: str, every: int = 2) -> None:
    if mode == "none":
        return
    for i, blk in enumerate(_blocks(method)):
        if mode == "full" or i % every == 0:
            blk.forward = functools.partial(checkpoint, blk.forward, use_reentrant=False)


def apply_compile(method: nn.Module) -> None:
    for blk in _blocks(method):
        blk.compile()  # in place: the module and its parameter names stay


def apply_fsdp2(method: nn.Module, cfg: StrategyConfig, mesh: DeviceMesh) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = None
    if cfg.precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                  reduce_dtype=torch.float32 if cfg.fsdp.reduce_fp32 else torch.bfloat16)
    kwargs = dict(mesh=mesh, mp_policy=mp) if mp else dict(mesh=mesh)
    for blk in _blocks(method):
        fully_shard(blk, reshard_after_forward=cfg.fsdp.reshard_after_forward, **kwargs)
    # The root keeps its parameters gathered after forward: backward needs them right away.
    fully_shard(method, reshard_after_forward=False, **kwargs)


def parallelize(method: nn.Module, cfg: StrategyConfig, mesh: DeviceMesh | None) -> nn.Module:
    """Returns the module to call for forward (the method itself, or its DDP wrapper)."""
    apply_activation_checkpointing(method, cfg.activation_checkpointing, cfg.ac_every)
    if cfg.compile:
        apply_compile(method)
    if cfg.name == "fsdp2":
        apply_fsdp2(method, cfg, mesh)
    elif cfg.name == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(method.parameters()).device
        return DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)
    return method
