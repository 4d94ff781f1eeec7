"""Training methods (see ``base.Method``) and their registry: ``method.name`` in a recipe
selects both the class and its typed config section."""
from __future__ import annotations

from .base import Method
from .classification import Classification, ClassificationConfig

METHODS: dict[str, type[Method]] = {"classification": Classification}
METHOD_CONFIGS: dict[str, type] = {name: cls.config_class for name, cls in METHODS.items()}


def build_method(cfg, model_cfg) -> Method:
    return METHODS[cfg.name](cfg, model_cfg)


__all__ = ["Method", "Classification", "ClassificationConfig", "METHODS", "METHOD_CONFIGS", "build_method"]
