"""Parameter and FLOP accounting for plain and specialized ViTs.

FLOPs are counted two independent ways and cross-checked:
- fvcore (multiply-adds, via a jit trace), with handles it lacks: scaled-dot-product
  attention (B·H·N·M·(d + dv)) and the routed LayerNorm's autograd Function, counted as
  fvcore counts an affine LayerNorm (5 per element: every token is normalised once and gets
  one affine, CLS or patch);
- torch's FlopCounterMode (FLOPs = 2 × multiply-adds, matmul-class ops only), with the CPU
  flash-attention kernels it misses mapped in. It also counts the backward pass, which gives
  the training FLOPs per image.

Nothing here needs the model's memory: the model is built on the meta device. fvcore traces
each part separately (a jit trace of a conv on meta tensors fails in torch 2.x, so the patch
embedding is traced on a real copy of itself, which is small even for ViT-g); the sum of the
parts is the whole forward, and it doubles as the per-block table.
"""
from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models import (
    RoutedLayerNorm,
    RoutedLayerScale,
    VisionTransformer,
    build_backbone,
    get_spec,
    is_cls_param,
    merge_lora,
    routed_modules,
)

__all__ = ["param_breakdown", "fvcore_forward_macs", "flop_counter_flops", "account", "Accounting", "report", "format_markdown"]

_SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_SDPA_CPU_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


# -- parameters -------------------------------------------------------------------------
def _cls_param_kinds(model: nn.Module) -> dict[str, str]:
    """Name of every CLS parameter -> the kind of layer it specializes (a low-rank qkv: lora)."""
    kinds = {}
    for prefix, layer in routed_modules(model):
        if isinstance(layer, RoutedLayerNorm):
            kind = "norm"
        elif isinstance(layer, RoutedLayerScale):
            kind = "layerscale"
        else:
            kind = "lora" if layer.lora_rank else "qkv"
        kinds.update({f"{prefix}.{leaf}": kind for leaf, _ in layer.named_parameters(recurse=False) if is_cls_param(leaf)})
    return kinds


def param_breakdown(model: nn.Module) -> dict:
    """Total/trainable params and the params specialization added, by kind and by block."""
    cls_kinds = _cls_param_kinds(model)
    total = trainable = 0
    extra = Counter({"norm": 0, "qkv": 0, "layerscale": 0, "lora": 0})
    per_block: dict[str, Counter] = {}
    for name, p in model.named_parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
        part = name.split(".")[0] + (f".{name.split('.')[1]}" if name.startswith("blocks.") else "")
        row = per_block.setdefault(part, Counter())
        if name in cls_kinds:
            extra[cls_kinds[name]] += p.numel()
            row["extra"] += p.numel()
            row[f"extra_{cls_kinds[name]}"] += p.numel()
        else:
            row["shared"] += p.numel()
    return {"total": total, "trainable": trainable, "extra": dict(extra), "per_part": {k: dict(v) for k, v in per_block.items()}}


# -- fvcore ----------------------------------------------------------------------------
def _sdpa_macs(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    *batch, n, d = q
    m, dv = k[-2], v[-1]
    lead = 1
    for s in batch:
        lead *= s
    return lead * n * m * (d + dv)


def _routed_layer_norm_macs(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    count = 1
    for s in get_shape(inputs[0]):
        count *= s
    return 5 * count  # fvcore's norm_flop_counter convention for an affine norm


def _fvcore(module: nn.Module, *inputs: torch.Tensor) -> Counter:
    from fvcore.nn import FlopCountAnalysis

    fca = FlopCountAnalysis(module, inputs)
    fca.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
    fca.set_op_handle("prim::PythonOp.RoutedLayerNormFunction", _routed_layer_norm_macs)
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    # fvcore logs each elementwise op it skips (add, gelu, mul): expected, not news.
    logging.getLogger("fvcore.nn.jit_analysis").setLevel(logging.ERROR)
    return Counter(fca.by_operator())


def fvcore_forward_macs(model: VisionTransformer, img_size: int, batch: int = 1) -> dict:
    """fvcore multiply-adds of one forward at ``img_size``, per part and per operator."""
    model = model.eval()
    c = model.cfg
    x = torch.randn(batch, c.in_chans, img_size, img_size)
    stem = copy.deepcopy(model.patch_embed).to_empty(device="cpu") if _on_meta(model) else model.patch_embed
    parts = {"patch_embed": _fvcore(stem, x)}
    n_tokens = (img_size // c.patch_size) ** 2 + c.num_prefix_tokens
    tokens = torch.randn(batch, n_tokens, c.embed_dim, device=_device(model))
    for i, blk in enumerate(model.blocks):
        parts[f"blocks.{i}"] = _fvcore(blk, tokens)
    parts["norm"] = _fvcore(model.norm, tokens)
    by_op = sum(parts.values(), Counter())
    return {"total": sum(by_op.values()), "by_operator": dict(by_op), "per_part": {k: sum(v.values()) for k, v in parts.items()}}


# -- torch FlopCounterMode ----------------------------------------------------------------
def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode hands formulas the input shapes (tensors when called directly).
    q, k, v = (getattr(t, "shape", t) for t in (query, key, value))
    *batch, n, d = q
    m, dv = k[-2], v[-1]
    lead = 1
    for s in batch:
        lead *= s
    return 2 * lead * n * m * (d + dv)


def _sdpa_cpu_bwd_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    # dV = Pᵀ·dO and dP = dO·Vᵀ (2·n·m·dv), dQ = dS·K and dK = dSᵀ·Q (2·n·m·d): twice the forward.
    return 2 * _sdpa_cpu_flops(query, key, value)


def flop_counter_flops(model: VisionTransformer, img_size: int, batch: int = 1, backward: bool = False) -> int:
    """torch FlopCounterMode FLOPs (2 × multiply-adds) of a forward (and backward)."""
    c = model.cfg
    x = torch.randn(batch, c.in_chans, img_size, img_size, device=_device(model))
    mapping = {_SDPA_CPU: _sdpa_cpu_flops, _SDPA_CPU_BWD: _sdpa_cpu_bwd_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        with torch.set_grad_enabled(backward):
            out = model.forward_features(x)
            if backward:
                (out["prenorm"].float().sum() + out["cls_norm"].float().sum()).backward()
    return counter.get_total_flops()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _on_meta(model: nn.Module) -> bool:
    return _device(model).type == "meta"


# -- the report --------------------------------------------------------------------------
@dataclass
class Accounting:
    arch: str
    spec: str
    params: dict
    vit_config: dict
    specialized: dict[int, list[str]]  # block index -> names of its routed layers
    flops: dict = field(default_factory=dict)  # per resolution


def account(arch: str, spec: str = "none", img_sizes: tuple[int, ...] = (224,), **vit_overrides) -> Accounting:
    """Params and FLOPs of ``arch`` specialized by preset ``spec``, built on the meta device."""
    get_spec(spec)  # refuse an unknown preset before building anything
    with torch.device("meta"):
        model = build_backbone(arch, spec, **vit_overrides)
    specialized: dict[int, list[str]] = {}
    for name, _ in routed_modules(model):
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            specialized.setdefault(int(i), []).append(rest)
    result = Accounting(arch, spec, param_breakdown(model), model.cfg.to_dict(), specialized)
    # Inference runs a LoRA model in its merged form (a full CLS matrix): the plain model's FLOPs.
    inference = merge_lora(copy.deepcopy(model)) if get_spec(spec).lora_rank else model
    p = model.cfg.patch_size
    for size in img_sizes:
        if size % p:
            raise ValueError(f"img_size={size} is not divisible by the patch size {p} of {arch}")
        fv = fvcore_forward_macs(inference, size)
        fwd_flops = flop_counter_flops(inference, size)
        train_flops = flop_counter_flops(model.train(), size, backward=True)
        matmul_macs = sum(v for k, v in fv["by_operator"].items() if k in ("linear", "conv", "scaled_dot_product_attention", "matmul", "bmm", "einsum"))
        result.flops[size] = {
            "forward_macs_fvcore": fv["total"],
            "forward_gflops_fvcore": 2 * fv["total"] / 1e9,
            "forward_flops_flop_counter": fwd_flops,
            "cross_check_matmul_macs_fvcore": matmul_macs,
            "cross_check_ok": 2 * matmul_macs == fwd_flops,
            "train_flops_per_image": train_flops,
            "by_operator_macs": fv["by_operator"],
            "per_part_macs": fv["per_part"],
        }
    return result


def report(arch: str, spec: str = "none", img_sizes: tuple[int, ...] = (224,), compare: str | None = None, **vit_overrides) -> dict:
    """The accounting report as a JSON-able dict (keys documented in README.md)."""
    main = account(arch, spec, img_sizes, **vit_overrides)
    plain_total = main.params["total"] - sum(main.params["extra"].values())
    blocks = []
    for i in range(main.vit_config["depth"]):
        row = main.params["per_part"].get(f"blocks.{i}", {})
        blocks.append({
            "block": i,
            "shared_params": row.get("shared", 0),
            "extra_params": row.get("extra", 0),
            "specialized": sorted(main.specialized.get(i, [])),
            "forward_macs": {str(s): f["per_part_macs"][f"blocks.{i}"] for s, f in main.flops.items()},
        })
    out = {
        "arch": arch,
        "spec": spec,
        "spec_config": get_spec(spec).to_dict(),
        "vit_config": main.vit_config,
        "params": {
            "total": main.params["total"],
            "trainable": main.params["trainable"],
            "plain_total": plain_total,
            "extra_total": main.params["total"] - plain_total,
            "extra_pct": 100.0 * (main.params["total"] - plain_total) / plain_total,
            "extra": main.params["extra"],
        },
        "resolutions": {
            str(s): {
                "forward_macs": f["forward_macs_fvcore"],
                "forward_gflops": f["forward_gflops_fvcore"],
                "flop_counter_forward_flops": f["forward_flops_flop_counter"],
                "cross_check_ok": f["cross_check_ok"],
                "train_flops": f["train_flops_per_image"],
                "train_gflops": f["train_flops_per_image"] / 1e9,
                "by_operator_macs": f["by_operator_macs"],
            }
            for s, f in main.flops.items()
        },
        "blocks": blocks,
    }
    if compare is not None:
        other = report(arch, compare, img_sizes, **vit_overrides)
        out["compare"] = {"spec": compare, "params": other["params"], "resolutions": other["resolutions"]}
        out["delta"] = {
            "params": out["params"]["total"] - other["params"]["total"],
            "forward_macs": {s: out["resolutions"][s]["forward_macs"] - other["resolutions"][s]["forward_macs"] for s in out["resolutions"]},
        }
    return out


def format_markdown(rep: dict) -> str:
    """A human-readable rendering of ``report``'s dict."""
    p = rep["params"]
    lines = [f"# {rep['arch']} — specialization `{rep['spec']}`", ""]
    cols = ["", rep["spec"]] + ([rep["compare"]["spec"]] if "compare" in rep else [])
    others = [rep["compare"]] if "compare" in rep else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def row(label, fn):
        lines.append("| " + " | ".join([label, fn(rep)] + [fn(o) for o in others]) + " |")

    row("params (total)", lambda r: f"{r['params']['total']:,}")
    row("params (trainable)", lambda r: f"{r['params']['trainable']:,}")
    row("extra vs plain", lambda r: f"{r['params']['extra_total']:,} ({r['params']['extra_pct']:.3f} %)")
    for kind in ("norm", "qkv", "layerscale", "lora"):
        row(f"  extra: {kind}", lambda r, k=kind: f"{r['params']['extra'][k]:,}")
    for s in rep["resolutions"]:
        row(f"forward GFLOPs @{s} (fvcore, 2×MACs)", lambda r, s=s: f"{r['resolutions'][s]['forward_gflops']:.3f}")
        row(f"forward MACs @{s}", lambda r, s=s: f"{r['resolutions'][s]['forward_macs']:,}")
        row(f"matmul FLOPs cross-check @{s}", lambda r, s=s: "ok" if r["resolutions"][s]["cross_check_ok"] else "MISMATCH")
        row(f"train GFLOPs/image @{s}", lambda r, s=s: f"{r['resolutions'][s]['train_gflops']:.3f}")
    if "delta" in rep:
        lines += ["", f"Difference `{rep['spec']}` − `{rep['compare']['spec']}`: {rep['delta']['params']:+,} params; "
                  + ", ".join(f"{d:+,} forward MACs @{s}" for s, d in rep["delta"]["forward_macs"].items())]
    sizes = list(rep["resolutions"])
    lines += ["", "## Per block", "", "| block | shared params | extra params | specialized | " + " | ".join(f"GMACs @{s}" for s in sizes) + " |",
              "|---|---|---|---|" + "---|" * len(sizes)]
    for b in rep["blocks"]:
        macs = " | ".join(f"{b['forward_macs'][s] / 1e9:.3f}" for s in sizes)
        lines.append(f"| {b['block']} | {b['shared_params']:,} | {b['extra_params']:,} | {', '.join(b['specialized']) or '—'} | {macs} |")
    return "\n".join(lines) + "\n"
