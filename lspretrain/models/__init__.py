"""Backbones: the plain ViT family and the layer-specialization mechanism applied to it."""
from .specialize import (
    PRESETS,
    RoutedLayerNorm,
    RoutedLayerScale,
    RoutedLinear,
    SpecializationSpec,
    get_spec,
    is_cls_param,
    merge_lora,
    routed_modules,
    specialize,
)
from .vit import VIT_ARCHS, Block, LayerScale, VisionTransformer, ViTConfig, create_vit, vit_config


def build_backbone(arch: str, spec: str | SpecializationSpec | dict = "none", **overrides) -> VisionTransformer:
    """A plain ViT of ``arch`` with ``overrides``, specialized by ``spec`` (a preset name)."""
    model = create_vit(arch, **overrides)
    spec = get_spec(spec)
    return model if spec.is_plain else specialize(model, spec)


__all__ = [
    "PRESETS", "RoutedLayerNorm", "RoutedLayerScale", "RoutedLinear", "SpecializationSpec", "get_spec",
    "is_cls_param", "merge_lora", "routed_modules", "specialize", "VIT_ARCHS", "Block", "LayerScale",
    "VisionTransformer", "ViTConfig", "create_vit", "vit_config", "build_backbone",
]
