"""Layer specialization: the [CLS] token gets its own LayerNorm, QKV and LayerScale parameters.

Method of "Revisiting [CLS] and Patch Token Interaction in Vision Transformers" (arXiv
2602.08626). The mechanism is one idea applied to three kinds of per-token layer: a *routed*
layer keeps the shared (patch) parameters under their original names (``weight``, ``bias``,
``gamma``) and adds ``cls_*`` parameters used by the first ``num_cls`` tokens of the sequence.
Every token passes through exactly one copy of each layer, so forward FLOPs are those of the
plain ViT, and a plain checkpoint loads into the shared parameters unchanged.

How each kind routes, chosen by measurement (benchmarks/specialization.py, BENCHMARKS.md):
- LayerNorm: one fused LayerNorm over the whole sequence with the patch affine, then the CLS
  rows redone with the CLS affine, in a small autograd Function (``RoutedLayerNormFunction``).
- LayerScale: one multiply with a per-token (N, C) table of gammas (``_per_token``).
- Linear (qkv): the CLS rows and the patch rows are two matmuls, concatenated.
- Linear with a low-rank CLS weight (W_cls = W + B·A): the shared matmul runs on every token,
  the rank-r delta is added to the CLS rows only. ``merge_lora`` turns it into a full CLS
  weight for inference, which brings the FLOPs back to exactly the plain model's.
Under ``torch.compile`` LayerNorm and LayerScale trace as one pointwise expression that picks
the CLS or patch affine per row (``torch.where``), which inductor fuses into the kernels of the
plain layer: a specialized ViT-S block then compiles to 72 kernels (forward + backward) where
the eager forms compile to 114 and the plain block to 60 (``benchmarks/specialization.py
--kernels``, BENCHMARKS.md).

``specialize(model, spec)`` swaps the layers of a plain ``VisionTransformer`` (fresh or
trained) in place; the CLS copies start equal to the shared weights and LoRA deltas at zero,
so the specialized model computes the plain model's function until training moves it.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, replace
from typing import ClassVar, Literal, Mapping, Union

import torch
import torch.nn.functional as F
from torch import nn

from .vit import LayerScale, VisionTransformer

__all__ = [
    "SpecializationSpec",
    "PRESETS",
    "get_spec",
    "specialize",
    "merge_lora",
    "RoutedLayerNorm",
    "RoutedLayerScale",
    "RoutedLinear",
    "routed_modules",
    "is_cls_param",
    "shared_twin",
    "cls_param_matches_shared",
    "spec_from_state_dict",
]

BlockSelection = Union[Literal["all", "none", "first_third"], tuple[int, ...]]


def _per_token(cls_value: torch.Tensor, patch_value: torch.Tensor, num_cls: int, seq_len: int) -> torch.Tensor:
    """(seq_len, C) table: the first ``num_cls`` rows hold ``cls_value``, the rest ``patch_value``.
    It is per sequence, not per batch element, so building it costs 1/B of the layer itself."""
    return torch.cat([cls_value.expand(num_cls, -1), patch_value.expand(seq_len - num_cls, -1)])


class RoutedLayerNormFunction(torch.autograd.Function):
    """LayerNorm with patch affine on every row, then the CLS rows recomputed with the CLS affine.

    Measured against split-and-concatenate and per-token affine tables (benchmarks/
    specialization.py), this is the only eager form whose forward and backward stay near one
    fused LayerNorm: the big kernel runs on the contiguous sequence and only the ``num_cls``
    rows are redone. The backward is one fused LayerNorm backward plus a CLS-row correction (the
    CLS rows' share is moved from the shared affine gradients to the CLS ones); the CLS rows'
    input and statistics are kept from the forward, so the correction copies only their gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, cls_weight, cls_bias, num_cls: int, eps: float):
        shape = (x.shape[-1],)
        y, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        x_cls = x[:, :num_cls].contiguous()
        y_cls, mean_cls, rstd_cls = torch.native_layer_norm(x_cls, shape, cls_weight, cls_bias, eps)
        y[:, :num_cls] = y_cls
        ctx.save_for_backward(x, weight, bias, cls_weight, cls_bias, mean, rstd, x_cls, mean_cls, rstd_cls)
        ctx.num_cls = num_cls
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, cls_weight, cls_bias, mean, rstd, x_cls, mean_cls, rstd_cls = ctx.saved_tensors
        n, shape, grad = ctx.num_cls, (x.shape[-1],), grad.contiguous()
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(grad, x, shape, mean, rstd, weight, bias, [True, True, True])
        dx_cls, dw_cls, db_cls = torch.ops.aten.native_layer_norm_backward(
            grad[:, :n].contiguous(), x_cls, shape, mean_cls, rstd_cls, cls_weight, cls_bias, [True, True, True])
        dx[:, :n] = dx_cls
        return dx, dw - dw_cls, db - db_cls, dw_cls, db_cls, None, None


def _cls_rows(x: torch.Tensor, num_cls: int) -> torch.Tensor:
    """(seq_len, 1) bool, True on the first ``num_cls`` rows."""
    return (torch.arange(x.shape[-2], device=x.device) < num_cls).unsqueeze(-1)


class RoutedLayerNorm(nn.LayerNorm):
    """LayerNorm whose affine parameters differ for the CLS tokens (normalisation is shared:
    it has no parameters)."""

    CLS_TWINS: ClassVar[dict[str, str]] = {"cls_weight": "weight", "cls_bias": "bias"}  # CLS parameter -> shared twin

    def __init__(self, shared: nn.LayerNorm, num_cls: int):
        super().__init__(shared.normalized_shape, eps=shared.eps, device=shared.weight.device, dtype=shared.weight.dtype)
        self.weight, self.bias = shared.weight, shared.bias
        self.cls_weight = nn.Parameter(shared.weight.detach().clone())
        self.cls_bias = nn.Parameter(shared.bias.detach().clone())
        self.num_cls = num_cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias, cls_weight, cls_bias = (p.to(x.dtype) for p in (self.weight, self.bias, self.cls_weight, self.cls_bias))
        if torch.compiler.is_compiling():
            # Under torch.compile one pointwise expression: inductor fuses the row choice into
            # the LayerNorm's own forward and backward kernels (the Function's separate CLS-row
            # kernels would stay separate there).
            cls = _cls_rows(x, self.num_cls)
            y = F.layer_norm(x, self.normalized_shape, eps=self.eps)
            return y * torch.where(cls, cls_weight, weight) + torch.where(cls, cls_bias, bias)
        return RoutedLayerNormFunction.apply(x, weight, bias, cls_weight, cls_bias, self.num_cls, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_cls={self.num_cls}"


class RoutedLayerScale(LayerScale):
    CLS_TWINS: ClassVar[dict[str, str]] = {"cls_gamma": "gamma"}

    def __init__(self, shared: LayerScale, num_cls: int):
        nn.Module.__init__(self)
        self.gamma = shared.gamma
        self.cls_gamma = nn.Parameter(shared.gamma.detach().clone())
        self.num_cls = num_cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a select inductor fuses into the multiply
            return x * torch.where(_cls_rows(x, self.num_cls), self.cls_gamma, self.gamma).to(x.dtype)
        return x * _per_token(self.cls_gamma, self.gamma, self.num_cls, x.shape[-2]).to(x.dtype)

    def extra_repr(self) -> str:
        return f"num_cls={self.num_cls}"


class RoutedLinear(nn.Linear):
    """Linear with its own weight for the CLS tokens: a full copy (``lora_rank == 0``) or the
    shared weight plus a rank-r delta ``cls_lora_b @ cls_lora_a`` (B starts at zero)."""

    # Full copy: cls_weight, cls_bias; low rank: cls_lora_a, cls_lora_b, cls_bias_delta (deltas on
    # the shared weight and bias, so their twins are those).
    CLS_TWINS: ClassVar[dict[str, str]] = {"cls_weight": "weight", "cls_bias": "bias", "cls_lora_a": "weight",
                                           "cls_lora_b": "weight", "cls_bias_delta": "bias"}

    def __init__(self, shared: nn.Linear, num_cls: int, lora_rank: int = 0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = shared.in_features, shared.out_features
        self.weight, self.bias = shared.weight, shared.bias
        self.num_cls = num_cls
        self.lora_rank = lora_rank
        like = dict(device=shared.weight.device, dtype=shared.weight.dtype)
        bias = shared.bias if shared.bias is not None else torch.zeros(shared.out_features, **like)
        if lora_rank:
            self.cls_lora_a = nn.Parameter(torch.empty(lora_rank, self.in_features, **like))
            self.cls_lora_b = nn.Parameter(torch.zeros(self.out_features, lora_rank, **like))
            self.cls_bias_delta = nn.Parameter(torch.zeros_like(bias))
            # LoRA's usual init: A random, B zero, so the delta starts at exactly zero while
            # gradients still reach B from the first step.
            nn.init.kaiming_uniform_(self.cls_lora_a, a=math.sqrt(5))
        else:
            self.cls_weight = nn.Parameter(shared.weight.detach().clone())
            self.cls_bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.num_cls
        if self.lora_rank:
            y = F.linear(x, self.weight, self.bias)
            delta = F.linear(F.linear(x[:, :n], self.cls_lora_a), self.cls_lora_b, self.cls_bias_delta)
            return torch.cat([y[:, :n] + delta, y[:, n:]], dim=1)
        return torch.cat(
            [F.linear(x[:, :n], self.cls_weight, self.cls_bias), F.linear(x[:, n:], self.weight, self.bias)], dim=1
        )

    def merged_cls_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The CLS weight and bias this layer applies, as full tensors."""
        if not self.lora_rank:
            return self.cls_weight, self.cls_bias
        bias = self.bias if self.bias is not None else 0
        return self.weight + self.cls_lora_b @ self.cls_lora_a, bias + self.cls_bias_delta

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_cls={self.num_cls}, lora_rank={self.lora_rank}"


ROUTED_TYPES = (RoutedLayerNorm, RoutedLayerScale, RoutedLinear)
# Leaf name of every CLS parameter -> leaf name of its shared twin in the same layer (one meaning
# per leaf across the routed types: ``cls_weight`` is the CLS copy of ``weight`` wherever it is).
_CLS_TWIN: dict[str, str] = {leaf: shared for t in ROUTED_TYPES for leaf, shared in t.CLS_TWINS.items()}
# The layers each spec field routes: their paths inside a block and the routed type replacing
# them; ``final_norm`` routes the model's ``norm``.
_BLOCK_LAYERS: dict[str, tuple[tuple[str, ...], type]] = {
    "norm": (("norm1", "norm2"), RoutedLayerNorm),
    "layerscale": (("ls1", "ls2"), RoutedLayerScale),
    "qkv": (("attn.qkv",), RoutedLinear),
}
_FINAL_NORM = "norm"


@dataclass(frozen=True)
class SpecializationSpec:
    """Which layers give the CLS token its own parameters.

    Block selections are ``"all"``, ``"none"``, ``"first_third"`` or a tuple of block indices.
    ``lora_rank`` 0 gives the CLS a full qkv matrix; r > 0 the shared one plus a rank-r delta.
    ``registers_with`` says which group register tokens join (the paper is silent; default
    patches: registers then keep the shared parameters).
    """

    norm: BlockSelection = "none"  # norm1 and norm2
    final_norm: bool = False
    qkv: BlockSelection = "none"
    layerscale: BlockSelection = "none"  # ls1 and ls2
    lora_rank: int = 0
    registers_with: Literal["patches", "cls"] = "patches"

    def __post_init__(self) -> None:
        for name in ("norm", "qkv", "layerscale"):
            sel = getattr(self, name)
            if isinstance(sel, list):  # YAML gives lists; keep the spec hashable
                object.__setattr__(self, name, tuple(sel))
            elif isinstance(sel, str) and sel not in ("all", "none", "first_third"):
                raise ValueError(f"{name}={sel!r}: expected 'all', 'none', 'first_third' or a list of block indices")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank!r}: expected 0 (full CLS matrix) or a rank >= 1")
        if self.registers_with not in ("patches", "cls"):
            raise ValueError(f"registers_with={self.registers_with!r}: expected 'patches' or 'cls'")

    def blocks(self, name: str, depth: int) -> tuple[int, ...]:
        """Resolve one selection to sorted block indices for a model of ``depth`` blocks."""
        sel = getattr(self, name)
        if sel == "all":
            return tuple(range(depth))
        if sel == "none":
            return ()
        if sel == "first_third":
            return tuple(range(max(1, round(depth / 3))))
        for i in sel:
            if not isinstance(i, int) or not 0 <= i < depth:
                raise ValueError(f"{name}: block index {i!r} is out of range for a model of depth {depth}")
        return tuple(sorted(set(sel)))

    @property
    def is_plain(self) -> bool:
        return self.norm == "none" and self.qkv == "none" and self.layerscale == "none" and not self.final_norm

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


DEFAULT_LORA_RANK = 32  # ViT-L: +0.40 % params with norms and LayerScale (see BENCHMARKS.md)
_paper = SpecializationSpec(norm="all", final_norm=True, layerscale="all", qkv="first_third")
PRESETS: dict[str, SpecializationSpec] = {
    "none": SpecializationSpec(),
    "norm": SpecializationSpec(norm="all", final_norm=True),
    "norm_ls": SpecializationSpec(norm="all", final_norm=True, layerscale="all"),
    "paper": _paper,
    "paper_lora": replace(_paper, lora_rank=DEFAULT_LORA_RANK),
}


def get_spec(spec: str | SpecializationSpec | dict, **overrides) -> SpecializationSpec:
    """A spec from a preset name, a dict (YAML), or a spec, with field overrides."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            close = difflib.get_close_matches(spec, PRESETS, n=2)
            raise ValueError(f"unknown specialization preset {spec!r}; did you mean {close}? presets: {list(PRESETS)}")
        spec = PRESETS[spec]
    elif isinstance(spec, dict):
        unknown = set(spec) - set(SpecializationSpec.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown specialization keys {sorted(unknown)}; valid: {list(SpecializationSpec.__dataclass_fields__)}")
        spec = SpecializationSpec(**spec)
    return replace(spec, **overrides) if overrides else spec


def specialize(model: VisionTransformer, spec: str | SpecializationSpec) -> VisionTransformer:
    """Give the CLS token its own parameters in the layers ``spec`` selects, in place.

    The shared parameters are the same ``nn.Parameter`` objects as before (an optimizer built
    on the plain model keeps tracking them); the CLS copies equal them at this point."""
    spec = get_spec(spec)
    if getattr(model, "specialization", None) is not None and not model.specialization.is_plain:
        raise ValueError("model is already specialized; build a plain model and specialize it once")
    depth, cfg = len(model.blocks), model.cfg
    num_cls = 1 + (cfg.num_registers if spec.registers_with == "cls" else 0)
    selected = {field: spec.blocks(field, depth) for field in _BLOCK_LAYERS}
    if selected["layerscale"] and cfg.layerscale_init is None:
        raise ValueError("spec specializes LayerScale but the model has none (layerscale_init=None)")
    if spec.lora_rank and not selected["qkv"]:
        raise ValueError(f"lora_rank={spec.lora_rank} but the spec specializes no qkv block")
    if spec.lora_rank > cfg.embed_dim:
        raise ValueError(f"lora_rank={spec.lora_rank} exceeds the model width {cfg.embed_dim}")
    for i, blk in enumerate(model.blocks):
        for field, (paths, routed) in _BLOCK_LAYERS.items():
            if i not in selected[field]:
                continue
            extra = {"lora_rank": spec.lora_rank} if routed is RoutedLinear else {}
            for path in paths:
                parent, _, attr = path.rpartition(".")
                owner = blk.get_submodule(parent)
                setattr(owner, attr, routed(getattr(owner, attr), num_cls, **extra))
    if spec.final_norm:
        setattr(model, _FINAL_NORM, RoutedLayerNorm(getattr(model, _FINAL_NORM), num_cls))
    model.specialization = spec
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every low-rank CLS qkv by the full matrix it computes (exact, in place): the
    inference form, with exactly the plain model's FLOPs."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, RoutedLinear) and child.lora_rank:
                weight, bias = child.merged_cls_weight()
                full = RoutedLinear(child, child.num_cls, lora_rank=0)
                full.cls_weight.copy_(weight)
                full.cls_bias.copy_(bias)
                setattr(module, name, full)
    spec = getattr(model, "specialization", None)
    if spec is not None and spec.lora_rank:
        model.specialization = replace(spec, lora_rank=0)
    return model


def routed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ROUTED_TYPES)]


def is_cls_param(name: str) -> bool:
    """True for the parameters specialization added (``...cls_weight``, ``...cls_lora_a``), not for
    the CLS token (``cls_token``), which every ViT has."""
    return name.rsplit(".", 1)[-1] in _CLS_TWIN


def shared_twin(name: str) -> str:
    """The shared parameter a CLS parameter belongs with, in the same layer
    (``blocks.0.norm1.cls_weight`` -> ``blocks.0.norm1.weight``; the LoRA factors and bias delta ->
    the weight and bias they modify); any other name unchanged."""
    parent, dot, leaf = name.rpartition(".")
    return parent + dot + _CLS_TWIN.get(leaf, leaf)


def cls_param_matches_shared(name: str, sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether CLS parameter ``name`` of state dict ``sd`` leaves its layer computing exactly
    what the shared parameters compute for the patches (dropping it would change nothing)."""
    layer, _, leaf = name.rpartition(".")
    if leaf in ("cls_lora_a", "cls_lora_b"):  # what matters is the delta B·A, not A or B alone
        a, b = sd[f"{layer}.cls_lora_a"], sd[f"{layer}.cls_lora_b"]
        return bool((b.float() @ a.float()).eq(0).all())
    if leaf == "cls_bias_delta":
        return bool(sd[name].eq(0).all())
    shared = sd.get(shared_twin(name))
    if shared is None:  # a CLS bias for a bias-free layer: equal iff zero
        return bool(sd[name].eq(0).all())
    return torch.equal(sd[name], shared)


def spec_from_state_dict(sd: Mapping[str, torch.Tensor], depth: int, registers_with: str = "patches") -> SpecializationSpec:
    """The specialization whose CLS parameters a backbone state dict of ``depth`` blocks holds
    (block lists, LoRA rank); ``registers_with`` is not visible in the weights."""

    def routed_blocks(field: str) -> list[int]:
        paths, routed = _BLOCK_LAYERS[field]
        cls_keys = {f"{paths[0]}.{leaf}" for leaf in routed.CLS_TWINS}
        return sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".", 2)[-1] in cls_keys})

    def selection(blocks: list[int]) -> BlockSelection:
        return "none" if not blocks else "all" if blocks == list(range(depth)) else tuple(blocks)

    lora_rank = next((v.shape[0] for k, v in sd.items() if k.endswith(".cls_lora_a")), 0)
    final_norm = any(f"{_FINAL_NORM}.{leaf}" in sd for leaf in RoutedLayerNorm.CLS_TWINS)
    return SpecializationSpec(norm=selection(routed_blocks("norm")), final_norm=final_norm,
                              qkv=selection(routed_blocks("qkv")), layerscale=selection(routed_blocks("layerscale")),
                              lora_rank=lora_rank, registers_with=registers_with)
