"""FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded per block; bf16
compute with fp32 reduction; hybrid sharding (shard in a node, replicate across nodes) on a
2-D mesh when ``strategy.fsdp.replicate_nodes > 1``."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..parallelize import sharded_blocks
from .base import Strategy


class FSDP2Strategy(Strategy):
    name = "fsdp2"

    def build_mesh(self) -> DeviceMesh:
        replicate = self.cfg.fsdp.replicate_nodes
        if self.world_size % replicate:
            raise ValueError(f"strategy.fsdp.replicate_nodes={replicate} does not divide the world size {self.world_size}")
        if replicate == 1:
            return init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("shard",))
        return init_device_mesh(self.device.type, (replicate, self.world_size // replicate),
                                mesh_dim_names=("replicate", "shard"))

    def wrap(self, method: nn.Module) -> nn.Module:
        """``fully_shard`` on each block, then on the root (the method, which gathers heads,
        embeddings and final norms); the method stays what forward is called on."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs = dict(mesh=self.build_mesh())
        if self.cfg.precision == "bf16":
            reduce_dtype = torch.float32 if self.cfg.fsdp.reduce_fp32 else torch.bfloat16
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype)
        for blk in sharded_blocks(method):
            fully_shard(blk, reshard_after_forward=self.cfg.fsdp.reshard_after_forward, **kwargs)
        # The root keeps its parameters gathered after forward: backward needs them right away.
        fully_shard(method, reshard_after_forward=False, **kwargs)
        return method

    def autocast(self):
        return contextlib.nullcontext()  # MixedPrecisionPolicy casts parameters and inputs

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        self.module.set_requires_gradient_sync(last)
        yield
