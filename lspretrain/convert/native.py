"""Our own formats: ``torch`` (a weights-only pickle) and ``safetensors``.

Both hold the backbone state dict in our key layout, specialized parameters included, with the
ViTConfig and SpecializationSpec that rebuild it:

- torch: ``{"format": "lspretrain.backbone", "version": 1, "vit": {...}, "spec": {...},
  "state_dict": {...}}``: only dicts, strings, numbers and tensors, so it loads with
  ``torch.load(path, weights_only=True)``;
- safetensors: the tensors, and in the header metadata ``"lspretrain"``: the same JSON
  (``"format": "pt"`` is kept as well, as transformers and timm expect it).

These are the files a recipe's ``init_from`` and ``hubconf.py`` read (``load_backbone``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .common import Backbone, ConversionError, Summary, cast, load_tensor_file

__all__ = ["FORMAT_TAG", "VERSION", "save_torch", "save_safetensors", "load_backbone"]

FORMAT_TAG = "lspretrain.backbone"
VERSION = 1


def _header(bb: Backbone) -> dict:
    return {"format": FORMAT_TAG, "version": VERSION, "vit": bb.vit, "spec": bb.spec}


def save_torch(bb: Backbone, out: Path, dtype: str = "fp32") -> Summary:
    sd = cast(bb.state_dict, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**_header(bb), "state_dict": sd}, out)
    return Summary.of("torch", [out], sd, bb.notes)


def save_safetensors(bb: Backbone, out: Path, dtype: str = "fp32") -> Summary:
    sd = cast(bb.state_dict, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata={"format": "pt", "lspretrain": json.dumps(_header(bb))})
    return Summary.of("safetensors", [out], sd, bb.notes)


def load_backbone(path: str | Path) -> Backbone:
    """A file written by ``save_torch``/``save_safetensors`` (checked, never unpickling code)."""
    path = Path(path)
    obj, meta = load_tensor_file(path)
    if "lspretrain" in meta:
        header, sd = json.loads(meta["lspretrain"]), obj
    elif isinstance(obj, dict) and obj.get("format") == FORMAT_TAG:
        header, sd = obj, obj["state_dict"]
    else:
        raise ConversionError(
            f"{path}: not an lspretrain backbone file (no {FORMAT_TAG!r} header); for a released "
            f"checkpoint use --from timm|dinov2|hf"
        )
    if header.get("version") != VERSION:
        raise ConversionError(f"{path}: backbone file version {header.get('version')!r}, this code reads {VERSION}")
    return Backbone(dict(sd), header["vit"], header["spec"], str(path))
