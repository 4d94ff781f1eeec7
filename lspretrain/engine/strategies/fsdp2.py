"""FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded per block; bf16
compute with fp32 reduction; hybrid sharding (shard in a node, replicate across nodes) on a
2-D mesh when ``strategy.fsdp.replicate_nodes > 1``."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..parallelize import parallelize
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
        return parallelize(method, self.cfg, self.build_mesh())

    def autocast(self):
        return contextlib.nullcontext()  # MixedPrecisionPolicy casts parameters and inputs

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        self.module.set_requires_gradient_sync(last)
        yield
