"""Activation checkpointing and compilation, applied to a method from outside, torchtitan style.

``Strategy.setup`` transforms the method in this order, each step on the blocks of
``method.sharded_modules()``:

1. activation checkpointing (``full``: every block; ``selective``: every ``ac_every``-th block),
2. ``torch.compile`` of each block (1 and 2: ``parallelize`` here),
3. data parallelism: the strategy's own ``wrap`` (``fsdp2``: ``fully_shard`` on each block, then
   on the root; ``ddp``: a ``DistributedDataParallel`` wrapper; ``deepspeed``: its engine;
   ``single``: nothing).

Checkpointing and compilation replace a block's ``forward`` / call path in place instead of
wrapping the block, so parameter names (optimizer groups, checkpoints) never change with them.
The model files know nothing of any of this.
"""
from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import StrategyConfig

__all__ = ["parallelize", "sharded_blocks"]


def sharded_blocks(method: nn.Module) -> list[nn.Module]:
    """The units of checkpointing, compilation and sharding: the blocks of every sharded backbone."""
    return [blk for backbone in method.sharded_modules() for blk in backbone.blocks]


def apply_activation_checkpointing(method: nn.Module, mode: str, every: int = 2) -> None:
    if mode == "none":
        return
    for i, blk in enumerate(sharded_blocks(method)):
        if mode == "full" or i % every == 0:
            blk.forward = functools.partial(checkpoint, blk.forward, use_reentrant=False)


def apply_compile(method: nn.Module) -> None:
    for blk in sharded_blocks(method):
        blk.compile()  # in place: the module and its parameter names stay


def parallelize(method: nn.Module, cfg: StrategyConfig) -> None:
    """Activation checkpointing, then compilation, in place; data parallelism comes after, from
    the strategy (``Strategy.wrap``)."""
    apply_activation_checkpointing(method, cfg.activation_checkpointing, cfg.ac_every)
    if cfg.compile:
        apply_compile(method)
