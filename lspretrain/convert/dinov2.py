"""The dinov2 repository's ``DinoVisionTransformer`` layout (its torch.hub backbones), both ways.

Block, norm, LayerScale (``ls1.gamma``) and MLP names (``mlp.fc1``/``fc2``, SwiGLU
``mlp.w12``/``w3``) are ours already; what differs is in ``KEY_MAP`` and in layout rules:
- dinov2 always has a position for CLS: a patch-only embedding (DeiT-III) gets a zero CLS slot
  (adds nothing at inference);
- dinov2 always has a mask token: a zero one is written when ours has none (training only);
- training checkpoints may chunk blocks (``blocks.<chunk>.<i>.``, with global ``i``): flattened.
A dinov2 checkpoint has no slot for the specialized CLS path: specialized backbones are refused.

The file is a bare state dict, as ``torch.hub.load("facebookresearch/dinov2", ...)`` loads it;
the ``DinoVisionTransformer`` arguments go into the safetensors metadata (``dinov2_model_args``)
and the summary. ``interpolate_offset=0.0`` and no antialiasing make dinov2 resize the
positional embedding exactly as our ViT does (its released models use offset 0.1).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .common import (
    Backbone, Summary, add_dinov2_family_slots, backbone_from_released, released_model_args, require_plain, save_released,
)

__all__ = ["KEY_MAP", "to_dinov2", "from_dinov2", "save", "load"]

# (ours, dinov2) key fragments; every other key is identical.
KEY_MAP = (("reg_token", "register_tokens"),)
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def to_dinov2(bb: Backbone, allow_equal_cls: bool = False) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """(state dict, DinoVisionTransformer kwargs, notes) for a plain backbone."""
    bb = require_plain(bb, "dinov2", allow_equal_cls)
    cfg, notes = bb.config, list(bb.notes)
    sd = dict(bb.state_dict)
    for ours, theirs in KEY_MAP:
        if ours in sd:
            sd[theirs] = sd.pop(ours)
    add_dinov2_family_slots(sd, cfg, notes, "dinov2")
    model_args = dict(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        ffn_bias=True, proj_bias=True, init_values=cfg.layerscale_init,
        ffn_layer="swiglufused" if cfg.ffn == "swiglu" else "mlp", block_chunks=0,
        num_register_tokens=cfg.num_registers, interpolate_antialias=False, interpolate_offset=0.0,
    )
    return sd, model_args, notes


def from_dinov2(sd: dict[str, torch.Tensor], source: str, num_heads: int | None = None, model_args: dict | None = None) -> Backbone:
    """A plain ``Backbone`` from a dinov2 backbone state dict (hub release or training teacher)."""
    model_args = model_args or {}
    out = {}
    for k, v in sd.items():
        k = _CHUNKED.sub(r"blocks.\1.", k)
        for ours, theirs in KEY_MAP:
            k = ours if k == theirs else k
        out[k] = v
    return backbone_from_released(out, source, num_heads, model_args)


def save(bb: Backbone, out: Path, dtype: str = "fp32", allow_equal_cls: bool = False) -> Summary:
    return save_released("dinov2", *to_dinov2(bb, allow_equal_cls), out, dtype, "DinoVisionTransformer args")


def load(sd: dict[str, torch.Tensor], meta: dict[str, str], source: str, num_heads: int | None = None) -> Backbone:
    return from_dinov2(sd, source, num_heads, released_model_args(meta, "dinov2"))
