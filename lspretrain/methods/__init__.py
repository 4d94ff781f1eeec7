"""Training methods (``base.Method``): ``classification`` (up to DeiT-III) and ``dinov2``.

``METHODS`` (``registry.py``) maps ``method.name`` to the method's config dataclass and its class.
This package imports only the registry and the config dataclasses, which the engine's config
loader reads; the implementations import the engine: import them from their own modules
(``lspretrain.methods.dinov2`` ...).
"""
from __future__ import annotations

from .configs import ClassificationConfig, DINOv2Config, MethodConfig
from .registry import METHODS, RegisteredMethod, build_method

__all__ = ["MethodConfig", "ClassificationConfig", "DINOv2Config", "METHODS", "RegisteredMethod", "build_method"]
