"""Distribution strategies behind one interface (see ``base.Strategy``)."""
from __future__ import annotations

import dataclasses
import logging

import torch

from ..config import StrategyConfig
from ..dist import DistEnv
from ..precision import resolve_precision
from ..strategy_registry import STRATEGIES, strategy_class
from .base import StepResult, Strategy, local_tensors

log = logging.getLogger(__name__)


def build_strategy(cfg: StrategyConfig, env: DistEnv, device: torch.device) -> Strategy:
    """The strategy ``cfg.name`` (``STRATEGIES``) on ``device``, with ``precision: auto`` resolved for it."""
    if cfg.name not in STRATEGIES:
        raise ValueError(f"strategy.name={cfg.name!r}: expected one of {', '.join(STRATEGIES)}")
    precision, why = resolve_precision(cfg.precision, device)
    if env.rank == 0:
        log.info("precision: %s (%s%s)", precision, "auto: " if cfg.precision == "auto" else "", why)
    cfg = dataclasses.replace(cfg, precision=precision)
    return strategy_class(cfg.name)(cfg, env, device)


__all__ = ["build_strategy", "STRATEGIES", "Strategy", "StepResult", "local_tensors"]
