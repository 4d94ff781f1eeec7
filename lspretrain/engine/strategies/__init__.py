"""Distribution strategies behind one interface (see ``base.Strategy``)."""
from __future__ import annotations

import dataclasses
import logging

import torch

from ..config import StrategyConfig
from ..dist import DistEnv
from ..precision import resolve_precision
from .base import StepResult, Strategy, local_tensors

log = logging.getLogger(__name__)


def build_strategy(cfg: StrategyConfig, env: DistEnv, device: torch.device) -> Strategy:
    """The strategy ``cfg.name`` on ``device``, with ``precision: auto`` resolved for it."""
    precision, why = resolve_precision(cfg.precision, device)
    if env.rank == 0:
        log.info("precision: %s (%s%s)", precision, "auto: " if cfg.precision == "auto" else "", why)
    cfg = dataclasses.replace(cfg, precision=precision)
    if cfg.name == "single":
        from .single import SingleStrategy as cls
    elif cfg.name == "ddp":
        from .ddp import DDPStrategy as cls
    elif cfg.name == "fsdp2":
        from .fsdp2 import FSDP2Strategy as cls
    elif cfg.name == "deepspeed":
        from .deepspeed import DeepSpeedStrategy as cls
    else:
        raise ValueError(f"strategy.name={cfg.name!r}: expected single, ddp, fsdp2 or deepspeed")
    return cls(cfg, env, device)


__all__ = ["build_strategy", "Strategy", "StepResult", "local_tensors"]
