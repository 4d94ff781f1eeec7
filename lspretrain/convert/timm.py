"""timm's ``VisionTransformer`` layout (DeiT-III and DINOv2 flavours), both directions.

Our names already are timm's; what differs is in ``KEY_MAP`` and in two layout rules:
- SwiGLU: timm's ``SwiGLUPacked`` calls the fused projections ``fc1``/``fc2`` (same
  ``silu(first half) * second half`` order as ours), we call them ``w12``/``w3``;
- registers: timm keeps no position for CLS when registers are present (``no_embed_class``),
  so the CLS position is folded into ``cls_token``, exactly as timm's own DINOv2 conversion
  does (at inference the CLS gets ``cls_token + pos[0]`` either way; it is never interpolated).
timm's ViT has no mask token: ours (iBOT, training only) is dropped and the summary says so.
A timm file has no slot for the specialized CLS path: specialized backbones are refused.

The file is a bare state dict (``.safetensors``, or a weights-only pickle otherwise); the
timm constructor arguments go into the safetensors metadata (``timm_model_args``) and the
summary. Build with ``timm.create_model("vit_base_patch16_224", pretrained=False,
num_classes=0, **model_args)`` (SwiGLU: ``mlp_layer=timm.layers.SwiGLUPacked``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .common import (
    Backbone, ConversionError, Summary, backbone_from_released, released_model_args, require_plain, save_released,
)

__all__ = ["KEY_MAP", "to_timm", "from_timm", "save", "load"]

# (ours, timm) key fragments, applied only to SwiGLU models; every other key is identical.
KEY_MAP = ((".mlp.w12.", ".mlp.fc1."), (".mlp.w3.", ".mlp.fc2."))
# timm keys that are not part of a backbone: read past on import, named in the summary.
HEAD_PREFIXES = ("head.", "head_drop.")


def _rename(key: str, pairs) -> str:
    for a, b in pairs:
        key = key.replace(a, b)
    return key


def to_timm(bb: Backbone, allow_equal_cls: bool = False) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """(state dict, timm model_args, notes) for a plain backbone."""
    bb = require_plain(bb, "timm", allow_equal_cls)
    cfg, notes = bb.config, list(bb.notes)
    pairs = KEY_MAP if cfg.ffn == "swiglu" else ()
    sd = {_rename(k, pairs): v for k, v in bb.state_dict.items()}
    if sd.pop("mask_token", None) is not None:
        notes.append("mask_token dropped: timm's ViT has none (iBOT masking, training only)")
    no_embed_class = not cfg.pos_embed_cls
    if cfg.num_registers and cfg.pos_embed_cls:
        pos = sd["pos_embed"]
        sd["cls_token"] = sd["cls_token"] + pos[:, :1]
        sd["pos_embed"] = pos[:, 1:]
        no_embed_class = True
        notes.append("CLS position folded into cls_token (timm's register layout has no CLS position)")
    hidden = bb.state_dict["blocks.0.mlp.w12.weight" if cfg.ffn == "swiglu" else "blocks.0.mlp.fc1.weight"].shape[0]
    model_args = dict(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=hidden / cfg.embed_dim, qkv_bias=cfg.qkv_bias,
        init_values=cfg.layerscale_init, class_token=True, no_embed_class=no_embed_class,
        reg_tokens=cfg.num_registers, global_pool="token", num_classes=0,
    )
    if cfg.ffn == "swiglu":
        model_args.update(mlp_layer="SwiGLUPacked", act_layer="silu")
    return sd, model_args, notes


def from_timm(sd: dict[str, torch.Tensor], source: str, num_heads: int | None = None, model_args: dict | None = None) -> Backbone:
    """A plain ``Backbone`` from a timm ViT state dict; the classifier head is read past."""
    model_args = model_args or {}
    notes = []
    head = sorted(k for k in sd if k.startswith(HEAD_PREFIXES))
    if head:
        notes.append(f"classifier head not imported: {', '.join(head)}")
    sd = {k: v for k, v in sd.items() if k not in head}
    if "fc_norm.weight" in sd:
        raise ConversionError(f"{source}: fc_norm present: average-pooled timm ViTs are not represented by our ViT (CLS pooling)")
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    # A packed SwiGLU projects to twice what its output layer reads; a GELU MLP to exactly it.
    swiglu = fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]
    if swiglu:
        sd = {_rename(k, [(b, a) for a, b in KEY_MAP]): v for k, v in sd.items()}
    return backbone_from_released(sd, source, num_heads, model_args, notes)


def save(bb: Backbone, out: Path, dtype: str = "fp32", allow_equal_cls: bool = False) -> Summary:
    return save_released("timm", *to_timm(bb, allow_equal_cls), out, dtype, "timm model_args")


def load(sd: dict[str, torch.Tensor], meta: dict[str, str], source: str, num_heads: int | None = None) -> Backbone:
    return from_timm(sd, source, num_heads, released_model_args(meta, "timm"))
