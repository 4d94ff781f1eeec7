"""The method registry: ``method.name`` -> the dataclass of the ``method`` config section and the
``Method`` class that trains with it.

Imports no engine module and no method implementation: the config loader (``engine/config.py``)
reads the schemas here, and the implementations, which import the engine, are imported only when
a method is built.
"""
from __future__ import annotations

import pkgutil
from dataclasses import dataclass

from .configs import ClassificationConfig, DINOv2Config

__all__ = ["RegisteredMethod", "METHODS", "build_method"]


@dataclass(frozen=True)
class RegisteredMethod:
    config_class: type  # the dataclass of the ``method`` section (methods/configs.py)
    implementation: str | type  # the Method class, or "module:Class" to import when it is built

    def method_class(self) -> type:
        if isinstance(self.implementation, type):
            return self.implementation
        return pkgutil.resolve_name(self.implementation)


METHODS: dict[str, RegisteredMethod] = {
    "classification": RegisteredMethod(ClassificationConfig, "lspretrain.methods.classification:Classification"),
    "dinov2": RegisteredMethod(DINOv2Config, "lspretrain.methods.dinov2:DINOv2"),
}


def build_method(cfg, model_cfg, total_steps: int):
    """The method ``cfg.name`` (its ``method`` section) on ``model_cfg``, for a run of
    ``total_steps`` optimizer steps (the length its own schedules span)."""
    return METHODS[cfg.name].method_class()(cfg, model_cfg, total_steps)
