"""Training methods (see ``base.Method``) and their registry: ``method.name`` in a recipe
selects both the class and its typed config section."""
from __future__ import annotations

from .base import Method
from .classification import Classification, ClassificationConfig
from .dinov2 import DINOv2, DINOv2Config

METHODS: dict[str, type[Method]] = {"classification": Classification, "dinov2": DINOv2}
METHOD_CONFIGS: dict[str, type] = {name: cls.config_class for name, cls in METHODS.items()}


def build_method(cfg, model_cfg) -> Method:
    return METHODS[cfg.name](cfg, model_cfg)


__all__ = ["Method", "Classification", "ClassificationConfig", "DINOv2", "DINOv2Config", "METHODS", "METHOD_CONFIGS", "build_method"]
