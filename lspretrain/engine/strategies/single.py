"""One process, no data parallelism (activation checkpointing / compile still apply)."""
from __future__ import annotations

from torch import nn

from .base import Strategy


class SingleStrategy(Strategy):
    name = "single"

    def wrap(self, method: nn.Module) -> nn.Module:
        if self.world_size > 1:
            raise ValueError(f"strategy.name=single runs one process, but the launcher started {self.world_size}")
        return method
