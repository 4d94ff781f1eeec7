"""Optimizer construction: config, parameter groups (weight decay, layer-wise lr decay), LAMB.

Parameter groups follow the public DINOv2 / BEiT / DeiT rules, applied to *names* and *ranks*
only, so they work on a plain model, on a backbone wrapped in a method module
(``student.backbone.blocks.3.attn.qkv.weight``) and on FSDP2 / DDP / compiled /
checkpoint-wrapped models whose names carry ``module.``, ``_orig_mod.`` ... segments.

- No weight decay on 1-D parameters (norm affines, biases, LayerScale gammas), on the
  positional embedding and on the cls / register / mask tokens.
- Layer id (for layer-wise lr decay): patch embedding, positional embedding and tokens -> 0,
  ``blocks.i`` -> i + 1, everything after the blocks (final norm, heads) -> num_layers + 1;
  lr scale = layer_decay ** (num_layers + 1 - layer_id).
- Patch-embedding parameters get an extra ``patch_embed_lr_mult`` (DINOv2: 0.2).
- Specialized [CLS] parameters (``cls_weight``, ``cls_lora_a`` ...) are classified as their
  shared twin (``weight``, ``bias``, ``gamma``; ``lspretrain.models.specialize.shared_twin``): same
  layer id, same decay rule, so the CLS copy of a layer trains under exactly the regime of the
  patch copy.

Every group carries ``lr_scale`` and ``wd_scale``; ``lspretrain.engine.schedules`` multiplies
the scheduled lr / wd by them at every step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..models.specialize import shared_twin

__all__ = ["OptimConfig", "scaled_lr", "param_groups", "canonical_name", "Lamb", "build_optimizer"]

_WRAPPER_SEGMENTS = frozenset({"module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})
_LAYER0_SEGMENTS = frozenset({"patch_embed", "pos_embed", "cls_token", "reg_token", "register_tokens", "mask_token"})
_NO_DECAY_SEGMENTS = frozenset({"pos_embed", "cls_token", "reg_token", "register_tokens", "mask_token"})


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer and lr / wd schedule settings. Steps count optimizer steps (after gradient
    accumulation), and ``global_batch_size`` means images per optimizer step, all ranks."""

    name: str = "adamw"  # "adamw" | "lamb"
    lr: float  # base lr, for base_batch_size images per step
    lr_scaling: str = "none"  # "none" | "linear" (DeiT: x batch/512) | "sqrt" (DINOv2: x sqrt(batch/1024))
    base_batch_size: int = 1024
    min_lr: float = 0.0  # final lr of the cosine; not scaled with the batch (as in dinov2/deit)
    warmup_steps: int = 0
    warmup_start_lr: float = 0.0
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # cosine wd schedule end value (DINOv2 0.04 -> 0.2); None: constant
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: float = 1.0  # layer-wise lr decay; 1.0 = off
    patch_embed_lr_mult: float = 1.0  # DINOv2: 0.2
    clip_grad: float | None = 3.0  # global grad-norm clip applied by the trainer; None = off
    accum_steps: int = 1
    # AdamW kernels: "auto" = fused (one kernel per step for all tensors, DTensor shards
    # included) on devices torch has fused kernels for; "fused", "foreach", "for_loop" force one
    implementation: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):  # YAML gives lists
            self.betas = tuple(self.betas)

        def fail(field: str, expected: str) -> None:
            raise ValueError(f"OptimConfig.{field}={getattr(self, field)!r}: expected {expected}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.name not in ("adamw", "lamb"):
            fail("name", "'adamw' or 'lamb'")
        if self.lr_scaling not in ("none", "linear", "sqrt"):
            fail("lr_scaling", "'none', 'linear' or 'sqrt'")
        if not self.lr > 0:
            fail("lr", "a positive learning rate")
        for field in ("min_lr", "warmup_start_lr", "weight_decay"):
            if not getattr(self, field) >= 0:
                fail(field, "a value >= 0")
        if self.weight_decay_end is not None and not self.weight_decay_end >= 0:
            fail("weight_decay_end", "None or a value >= 0")
        if not is_int(self.base_batch_size) or self.base_batch_size < 1:
            fail("base_batch_size", "an integer >= 1")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            fail("warmup_steps", "an integer >= 0")
        if not is_int(self.accum_steps) or self.accum_steps < 1:
            fail("accum_steps", "an integer >= 1")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            fail("betas", "two values in [0, 1)")
        if not self.eps > 0:
            fail("eps", "a positive value")
        if not 0.0 < self.layer_decay <= 1.0:
            fail("layer_decay", "a value in (0, 1] (1.0 = no layer-wise decay)")
        if not self.patch_embed_lr_mult >= 0:
            fail("patch_embed_lr_mult", "a value >= 0")
        if self.clip_grad is not None and not self.clip_grad > 0:
            fail("clip_grad", "None (no clipping) or a positive max norm")
        if self.implementation not in ("auto", "fused", "foreach", "for_loop"):
            fail("implementation", "'auto', 'fused', 'foreach' or 'for_loop'")


def scaled_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    """The peak lr for ``global_batch_size`` images per optimizer step (all ranks, all
    accumulation micro-steps), by ``cfg.lr_scaling``."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size}: expected >= 1")
    ratio = global_batch_size / cfg.base_batch_size
    if cfg.lr_scaling == "linear":
        return cfg.lr * ratio
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(ratio)
    return cfg.lr


def canonical_name(name: str) -> str:
    """``name`` without the segments wrappers add (DDP ``module.``, compile ``_orig_mod.``,
    activation checkpointing ``_checkpoint_wrapped_module.``, FSDP1 ``_fsdp_wrapped_module.``)."""
    return ".".join(s for s in name.split(".") if s not in _WRAPPER_SEGMENTS)


def _layer_id(segments: list[str], num_layers: int) -> int:
    if _LAYER0_SEGMENTS.intersection(segments):
        return 0
    for i, seg in enumerate(segments[:-1]):
        if seg == "blocks" and segments[i + 1].isdigit():
            block = int(segments[i + 1])
            if block >= num_layers:
                raise ValueError(f"parameter in blocks.{block} but num_layers={num_layers}")
            return block + 1
    return num_layers + 1


def _decays(segments: list[str], ndim: int) -> bool:
    leaf = shared_twin(segments[-1])  # a CLS parameter decays as its shared twin
    if _NO_DECAY_SEGMENTS.intersection(segments):
        return False
    return ndim > 1 and leaf != "bias" and leaf != "gamma"


def param_groups(model: nn.Module, cfg: OptimConfig, num_layers: int) -> list[dict]:
    """Optimizer parameter groups of ``model`` (see the module docstring for the rules).

    Parameters with equal ``(lr_scale, wd_scale)`` share one group; groups come in order of
    first appearance in ``named_parameters`` (deterministic, identical on every rank, which
    optimizer checkpoints rely on). Each group: ``params``, ``param_names`` (as the model
    names them; torch optimizers keep them in their state dict), ``name``, ``lr_scale``,
    ``wd_scale`` (0.0 or 1.0). Frozen parameters (requires_grad False) are left out."""
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        segments = canonical_name(name).split(".")
        layer = _layer_id(segments, num_layers)
        lr_scale = cfg.layer_decay ** (num_layers + 1 - layer)
        if "patch_embed" in segments:
            lr_scale *= cfg.patch_embed_lr_mult
        wd_scale = 1.0 if _decays(segments, p.ndim) else 0.0
        key = (lr_scale, wd_scale)
        if key not in groups:
            kind = "decay" if wd_scale else "no_decay"
            groups[key] = dict(params=[], param_names=[], name=f"{kind}_lr{lr_scale:.4g}", lr_scale=lr_scale, wd_scale=wd_scale)
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    if not groups:
        raise ValueError("model has no trainable parameters")
    return list(groups.values())


def _full_sq_norms(tensors: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norms, (n,) at least fp32, of the full tensors whose local shards are
    ``tensors``, laid out like ``params``: for DTensor parameters the shards' sums of squares
    are all-reduced over the mesh dimensions they are sharded on (replicated dimensions already
    hold the full sum), one all-reduce per layout, never a ``full_tensor()``."""
    out_dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    sq = torch.empty(len(tensors), dtype=out_dtype, device=tensors[0].device)
    for dtype, idx in by_dtype.items():
        norms = torch._foreach_norm([tensors[i] for i in idx], 2, dtype=torch.promote_types(dtype, torch.float32))
        sq[idx] = torch.stack(norms).to(out_dtype) ** 2
    layouts: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if isinstance(p, DTensor):
            sharded = []
            for dim, placement in enumerate(p.placements):
                if placement.is_shard():
                    sharded.append(dim)
                elif not placement.is_replicate():
                    raise NotImplementedError(f"Lamb: unsupported DTensor placement {placement} for a parameter")
            if sharded:
                layouts.setdefault((id(p.device_mesh), p.device_mesh, tuple(sharded)), []).append(i)
    for (_, mesh, dims), idx in layouts.items():
        part = sq[idx]
        for dim in dims:
            dist.all_reduce(part, group=mesh.get_group(dim))
        sq[idx] = part
    return sq


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019) as in timm / DeiT-III.

    Adam moments with bias correction, ``u = m_hat / (sqrt(v_hat) + eps) + wd * p``, trust
    ratio ``||p|| / ||u||`` (1 when either norm is 0; clamped to <= 1 with ``trust_clip``),
    ``p -= lr * trust * u``. Like timm, groups with weight_decay == 0 (biases, norms) are not
    adapted unless ``always_adapt``. Unlike timm's Lamb, there is no built-in global grad-norm
    clip (timm defaults to max_grad_norm=1.0): the trainer clips, so the DeiT-III recipe needs
    ``clip_grad=1.0`` to match.

    One step is a fixed number of ``torch._foreach_*`` calls per parameter group, whatever its
    number of tensors (a per-tensor loop costs ~15 kernel launches per tensor, about 5,000 per
    step for a DeiT-III ViT-L; the elementwise math is the same, operation for operation). The
    step counts live on the CPU (bias corrections are host scalars: no device read).

    DTensor (FSDP2) parameters: the elementwise math runs on local shards, and the two norms
    are full-tensor norms (shard sums of squares all-reduced, see ``_full_sq_norms``). State
    tensors are DTensors like their parameters, so distributed checkpoints reshard them.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        trust_clip: bool = False,
        always_adapt: bool = False,
    ):
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: invalid lr={lr}, eps={eps}, weight_decay={weight_decay} or betas={betas}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, trust_clip=trust_clip, always_adapt=always_adapt)
        super().__init__(params, defaults)

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("Lamb does not support sparse gradients")
            beta1, beta2 = group["betas"]
            wd = group["weight_decay"]
            states = [self._state(p) for p in params]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1.0)
            counts = [s.item() for s in steps]  # CPU tensors: no device synchronization
            grads = [_local(p.grad) for p in params]
            m = [_local(s["exp_avg"]) for s in states]
            v = [_local(s["exp_avg_sq"]) for s in states]
            w = [_local(p) for p in params]
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, grads, alpha=1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in counts])
            torch._foreach_add_(denom, group["eps"])
            update = torch._foreach_div(m, [1 - beta1**t for t in counts])
            torch._foreach_div_(update, denom)
            if wd != 0:
                torch._foreach_add_(update, w, alpha=wd)
            if wd != 0 or group["always_adapt"]:
                w_norm = _full_sq_norms(w, params).sqrt()
                u_norm = _full_sq_norms(update, params).sqrt()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                if group["trust_clip"]:
                    trust = trust.clamp(max=1.0)
                torch._foreach_mul_(update, [t.to(u.dtype) for t, u in zip(trust.unbind(), update)])
            torch._foreach_add_(w, update, alpha=-group["lr"])
        return loss


def _adamw_kernels(groups: list[dict], implementation: str) -> dict:
    """AdamW's ``fused`` / ``foreach`` arguments for ``optim.implementation``."""
    if implementation == "auto":
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        params = [p for g in groups for p in g["params"]]
        fused_ok = all(p.device.type in _get_fused_kernels_supported_devices() and p.is_floating_point() for p in params)
        implementation = "fused" if fused_ok else "foreach"
    return {"fused": dict(fused=True), "foreach": dict(foreach=True), "for_loop": dict(foreach=False)}[implementation]


def build_optimizer(groups: list[dict], cfg: OptimConfig, lr_for_init: float | None = None) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg`` over ``groups`` (from ``param_groups``). Each group starts
    at ``lr_for_init`` (default ``cfg.lr``) x its ``lr_scale`` and ``cfg.weight_decay`` x its
    ``wd_scale``; ``apply_schedules`` overwrites both before every step. AdamW runs the kernels
    ``cfg.implementation`` names (LAMB is always foreach)."""
    lr = cfg.lr if lr_for_init is None else lr_for_init
    groups = [
        {**g, "lr": lr * g.get("lr_scale", 1.0), "weight_decay": cfg.weight_decay * g.get("wd_scale", 1.0)} for g in groups
    ]
    if cfg.name == "lamb":
        return Lamb(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             **_adamw_kernels(groups, cfg.implementation))
