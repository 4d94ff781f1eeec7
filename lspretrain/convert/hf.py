"""Hugging Face transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` directories.

The directory holds ``config.json`` and ``model.safetensors`` in the layout the hub's
``facebook/dinov2-*`` repositories use (the one ``save_pretrained`` writes). Per-block names
are in ``BLOCK_MAP``; the other differences are layout rules:
- HF splits the fused qkv into ``query``/``key``/``value`` (rows in that order);
- HF always has a CLS position, a mask token and LayerScale: a patch-only positional embedding
  gets a zero CLS slot, a missing mask token a zero one, a model without LayerScale gammas of
  one; each adds nothing at inference and is named in the summary;
- registers make it ``Dinov2WithRegistersModel`` (``embeddings.register_tokens``).
HF's Dinov2 has no slot for the specialized CLS path: specialized backbones are refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .common import (
    Backbone, ConversionError, Summary, add_dinov2_family_slots, cast, infer_vit_config, load_tensor_file,
    require_plain,
)
from ..models.specialize import spec_from_state_dict

__all__ = ["EMBED_MAP", "BLOCK_MAP", "to_hf", "from_hf", "save", "load"]

EMBED_MAP = {  # ours -> HF, outside the blocks
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "reg_token": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
BLOCK_MAP = {  # ours (under blocks.N.) -> HF (under encoder.layer.N.); qkv is split, see below
    "norm1": "norm1",
    "attn.proj": "attention.output.dense",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w12": "mlp.weights_in",
    "mlp.w3": "mlp.weights_out",
    "ls2.gamma": "layer_scale2.lambda1",
}
QKV = ("query", "key", "value")
HEAD_PREFIXES = ("classifier.",)  # Dinov2ForImageClassification's head: read past on import


def _map_key(key: str) -> str:
    if key in EMBED_MAP:
        return EMBED_MAP[key]
    _, i, rest = key.split(".", 2)
    for ours, theirs in BLOCK_MAP.items():
        if rest == ours or rest.startswith(ours + "."):
            return f"encoder.layer.{i}.{theirs}{rest[len(ours):]}"
    raise KeyError(key)


def to_hf(bb: Backbone, allow_equal_cls: bool = False) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """(state dict, config.json dict, notes) for a plain backbone."""
    bb = require_plain(bb, "hf", allow_equal_cls)
    cfg, notes = bb.config, list(bb.notes)
    src = dict(bb.state_dict)
    add_dinov2_family_slots(src, cfg, notes, "HF Dinov2")
    if cfg.layerscale_init is None:
        for i in range(cfg.depth):
            for ls in ("ls1", "ls2"):
                src[f"blocks.{i}.{ls}.gamma"] = src["cls_token"].new_ones(cfg.embed_dim)
        notes.append("LayerScale gammas of one added (HF Dinov2 always scales; x * 1 = x)")
    sd = {}
    for k, v in src.items():
        if ".attn.qkv." in k:
            i, leaf = k.split(".")[1], k.rsplit(".", 1)[1]
            for name, part in zip(QKV, v.chunk(3, dim=0)):
                sd[f"encoder.layer.{i}.attention.attention.{name}.{leaf}"] = part.clone()
        else:
            sd[_map_key(k)] = v
    if not float(cfg.mlp_ratio).is_integer():
        # transformers validates mlp_ratio as an int (hidden = int(width * mlp_ratio)).
        raise ConversionError(f"{bb.source}: mlp_ratio={cfg.mlp_ratio} is not an integer, which HF Dinov2 configs require")
    regs = cfg.num_registers
    config = dict(
        architectures=["Dinov2WithRegistersModel" if regs else "Dinov2Model"],
        model_type="dinov2_with_registers" if regs else "dinov2",
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        mlp_ratio=int(cfg.mlp_ratio), hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=0.02, layer_norm_eps=cfg.norm_eps, image_size=cfg.img_size, patch_size=cfg.patch_size,
        num_channels=cfg.in_chans, qkv_bias=cfg.qkv_bias, layerscale_value=cfg.layerscale_init or 1.0,
        drop_path_rate=0.0, use_swiglu_ffn=cfg.ffn == "swiglu", use_mask_token=True,
    )
    if regs:
        config["num_register_tokens"] = regs
    return sd, config, notes


def from_hf(sd: dict[str, torch.Tensor], config: dict, source: str) -> Backbone:
    """A plain ``Backbone`` from an HF Dinov2 state dict and its config.json."""
    if config.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"{source}: hidden_act={config['hidden_act']!r}; our ViT's MLP is exact GELU")
    notes = []
    head = sorted(k for k in sd if k.startswith(HEAD_PREFIXES))
    if head:
        notes.append(f"classifier head not imported: {', '.join(head)}")
    # Dinov2ForImageClassification nests the backbone under "dinov2."
    sd = {k.removeprefix("dinov2."): v for k, v in sd.items() if k not in head}
    inverse = {v: k for k, v in EMBED_MAP.items()}
    out, qkv = {}, {}
    for k, v in sd.items():
        if k in inverse:
            out[inverse[k]] = v
            continue
        parts = k.split(".")
        if parts[:2] != ["encoder", "layer"]:
            raise ConversionError(f"{source}: unexpected key {k!r} for a Dinov2 model")
        i, rest = parts[2], ".".join(parts[3:])
        if rest.startswith("attention.attention."):
            name, leaf = parts[5], parts[6]
            qkv.setdefault((i, leaf), {})[name] = v
            continue
        for ours, theirs in BLOCK_MAP.items():
            if rest == theirs or rest.startswith(theirs + "."):
                out[f"blocks.{i}.{ours}{rest[len(theirs):]}"] = v
                break
        else:
            raise ConversionError(f"{source}: unexpected key {k!r} for a Dinov2 model")
    for (i, leaf), parts in qkv.items():
        missing = set(QKV) - set(parts)
        if missing:
            raise ConversionError(f"{source}: block {i} lacks attention {sorted(missing)} {leaf}")
        out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([parts[n] for n in QKV], dim=0)
    vit = infer_vit_config(
        out, source, config.get("num_attention_heads"), mlp_ratio=config.get("mlp_ratio"),
        layerscale_init=config.get("layerscale_value"), norm_eps=config.get("layer_norm_eps"),
    )
    return Backbone(out, vit, spec_from_state_dict(out, vit["depth"]).to_dict(), source, notes)


def save(bb: Backbone, out: Path, dtype: str = "fp32", allow_equal_cls: bool = False) -> Summary:
    from safetensors.torch import save_file

    sd, config, notes = to_hf(bb, allow_equal_cls)
    sd = cast(sd, dtype)
    config["torch_dtype"] = "bfloat16" if dtype == "bf16" else "float32"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return Summary.of("hf", [out / "config.json", out / "model.safetensors"], sd, notes)


def load(path: Path) -> Backbone:
    """An HF directory: config.json + model.safetensors (or a sharded index, or a weights-only
    pytorch_model.bin)."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{path}: no config.json, not a Hugging Face model directory")
    config = json.loads(config_path.read_text())
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()][:1]
    if not files:
        raise ConversionError(f"{path}: no model.safetensors or pytorch_model.bin")
    sd = {}
    for name in files:
        sd.update(load_tensor_file(path / name)[0])
    return from_hf(sd, config, str(path))
