"""The strategy registry: ``strategy.name`` -> the ``Strategy`` class that runs it.

A module of its own, importing nothing: the config loader (``engine/config.py``) checks
``strategy.name`` against these names, while the strategies import the config (and DeepSpeed's
imports DeepSpeed), so each class is imported only when ``build_strategy`` builds it.
"""
from __future__ import annotations

import pkgutil

__all__ = ["STRATEGIES", "strategy_class"]

STRATEGIES: dict[str, str] = {
    "single": "lspretrain.engine.strategies.single:SingleStrategy",
    "ddp": "lspretrain.engine.strategies.ddp:DDPStrategy",
    "fsdp2": "lspretrain.engine.strategies.fsdp2:FSDP2Strategy",
    "deepspeed": "lspretrain.engine.strategies.deepspeed:DeepSpeedStrategy",
}


def strategy_class(name: str) -> type:
    return pkgutil.resolve_name(STRATEGIES[name])
