"""ONNX export of the backbone's inference forward, specialized or plain.

Graph: ``images`` (B, C, H, W) at the stored resolution, batch dynamic -> ``cls`` (B, C),
``patch_tokens`` (B, N, C) and, with registers, ``register_tokens`` (B, R, C), all after the
final norm (``forward_features``' ``*_norm`` outputs).

The specialized model exports exactly: LoRA is merged first (``merge_lora``: a full CLS qkv,
the plain model's FLOPs), and each ``RoutedLayerNorm``, whose training form is a custom
autograd Function the TorchScript exporter cannot see through, is swapped for
``_SplitLayerNorm``: two plain LayerNorms over the CLS rows and the other rows. LayerNorm works
row by row, so that is the same function with the same parameters. RoutedLayerScale and
RoutedLinear are plain ops already.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models import RoutedLayerNorm, merge_lora
from .common import Backbone, ConversionError, Summary

__all__ = ["export_model", "save"]

OPSET = 17


class _SplitLayerNorm(nn.Module):
    def __init__(self, routed: RoutedLayerNorm):
        super().__init__()
        self.weight, self.bias = routed.weight, routed.bias
        self.cls_weight, self.cls_bias = routed.cls_weight, routed.cls_bias
        self.num_cls, self.eps, self.shape = routed.num_cls, routed.eps, routed.normalized_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.num_cls
        cls = F.layer_norm(x[:, :n], self.shape, self.cls_weight, self.cls_bias, self.eps)
        return torch.cat([cls, F.layer_norm(x[:, n:], self.shape, self.weight, self.bias, self.eps)], dim=1)


class _Inference(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        out = self.model.forward_features(images)
        if self.model.cfg.num_registers:
            return out["cls_norm"], out["patches_norm"], out["registers_norm"]
        return out["cls_norm"], out["patches_norm"]


def export_ready(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in its export form (LoRA merged, routed norms as plain ops)."""
    model = merge_lora(copy.deepcopy(model)).eval()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, RoutedLayerNorm):
                setattr(module, name, _SplitLayerNorm(child))
    return model


def export_model(model: nn.Module, out: Path, batch: int = 1) -> list[str]:
    """Write ``model``'s inference forward to ``out``; returns the output names."""
    cfg = model.cfg
    wrapped = _Inference(export_ready(model))
    names = ["cls", "patch_tokens"] + (["register_tokens"] if cfg.num_registers else [])
    example = torch.zeros(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript; this one needs nothing beyond torch and handles this graph exactly.
        warnings.simplefilter("ignore", DeprecationWarning)
        # Shape checks in the forward become constants: the graph is for the stored resolution.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            wrapped, (example,), str(out), dynamo=False, opset_version=OPSET, input_names=["images"],
            output_names=names, dynamic_axes={n: {0: "batch"} for n in ["images", *names]},
        )
    return names


def save(bb: Backbone, out: Path, dtype: str = "fp32") -> Summary:
    if dtype != "fp32":
        raise ConversionError(f"onnx export is fp32 only (asked for {dtype}): bf16 kernels are missing from common ONNX runtimes")
    model = bb.build()
    names = export_model(model, out)
    sd = export_ready(model).state_dict()
    notes = bb.notes + [f"inputs: images (B, {model.cfg.in_chans}, {model.cfg.img_size}, {model.cfg.img_size}); outputs: {', '.join(names)}"]
    if bb.specialization.lora_rank:
        notes.append("LoRA merged into full CLS qkv weights")
    return Summary.of("onnx", [out], sd, notes)
