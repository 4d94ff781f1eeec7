"""torch.hub entrypoints: our (specialized) ViT backbones, built from a converted file.

    model = torch.hub.load("path/to/lspretrain", "backbone", source="local", weights="vitl.safetensors")
    model = torch.hub.load("path/to/lspretrain", "vit_large_patch14", source="local", spec="paper",
                           weights="vitl.safetensors")

``weights`` is a file written by ``tools/convert_checkpoint.py --to torch|safetensors``: it
carries the architecture and specialization, so ``backbone`` needs nothing else; a per-arch
entrypoint checks the file against the architecture and spec it names. Files are read with
``weights_only=True`` or as safetensors.
"""
from lspretrain.convert import load_backbone
from lspretrain.models import VIT_ARCHS, build_backbone, get_spec
from lspretrain.models import merge_lora as _merge_lora

dependencies = ["torch", "safetensors"]


def backbone(weights: str, merge_lora: bool = False):
    """The backbone stored in ``weights`` (eval mode); ``merge_lora``: the inference form with
    full CLS qkv matrices (the plain model's FLOPs)."""
    model = load_backbone(weights).build()
    return _merge_lora(model) if merge_lora else model


def _function_of(vit: dict) -> dict:
    """The config fields that define the function: init values and drop-path rates only matter
    for training, and a converted file may not know the ones the run used."""
    out = {k: v for k, v in vit.items() if k not in ("layerscale_init", "drop_path_rate", "drop_path_uniform")}
    return {**out, "layerscale": vit["layerscale_init"] is not None}


def _entrypoint(arch: str):
    def build(weights: str | None = None, spec: str = "none", merge_lora: bool = False, **overrides):
        if weights is None:
            return build_backbone(arch, spec, **overrides)
        stored = load_backbone(weights)
        expected = build_backbone(arch, spec, **overrides)
        if _function_of(stored.vit) != _function_of(expected.cfg.to_dict()) or stored.spec != get_spec(spec).to_dict():
            raise ValueError(f"{weights}: holds {stored.vit} with spec {stored.spec}, not {arch} with spec {spec!r} "
                             f"and {overrides}; use the 'backbone' entrypoint to build what the file holds")
        model = stored.build()
        return _merge_lora(model) if merge_lora else model

    build.__name__ = arch
    build.__doc__ = f"{arch} ({VIT_ARCHS[arch]}), specialized by preset ``spec``, optionally with converted ``weights``."
    return build


for _arch in VIT_ARCHS:
    globals()[_arch] = _entrypoint(_arch)
