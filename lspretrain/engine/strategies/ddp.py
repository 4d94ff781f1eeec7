"""DistributedDataParallel: replicated parameters, all-reduced gradients."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from ..parallelize import parallelize
from .base import Strategy


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, method: nn.Module) -> nn.Module:
        return parallelize(method, self.cfg, None)

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        with contextlib.nullcontext() if last else self.module.no_sync():
            yield
