"""DistributedDataParallel: replicated parameters, all-reduced gradients."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .base import Strategy


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, method: nn.Module) -> nn.Module:
        device = next(method.parameters()).device
        return DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        with contextlib.nullcontext() if last else self.module.no_sync():
            yield
