#!/usr/bin/env python
"""Step time of specialized vs plain ViTs, and of our routed layers vs the naive way.

    python benchmarks/specialization.py [--archs vit_small_patch16 vit_base_patch16] [--reps 15]

For each arch, three models with the same weights: plain, specialized (``paper`` preset, our
routed layers) and naive (the same specialization done by splitting the sequence, running a
CLS copy and the shared module, and concatenating). Training step (forward + backward +
AdamW) and inference forward run under bf16 autocast on CPU, interleaved round-robin so that
load from other processes hits every variant alike. Prints medians and the median of the
per-round ratios. Goals: training ratio <= 1.03, inference ratio <= 1.01.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from lspretrain.models import RoutedLayerNorm, RoutedLayerScale, RoutedLinear, create_vit, specialize


class SplitConcat(nn.Module):
    """The naive routing: two modules on two slices of the sequence, concatenated."""

    def __init__(self, shared: nn.Module, cls: nn.Module, num_cls: int):
        super().__init__()
        self.shared, self.cls, self.num_cls = shared, cls, num_cls

    def forward(self, x):
        n = self.num_cls
        return torch.cat([self.cls(x[:, :n]), self.shared(x[:, n:])], dim=1)


def naive_copy(special: nn.Module) -> nn.Module:
    """The same specialized weights, routed by split-and-concatenate."""
    from lspretrain.models.vit import LayerScale

    model = copy.deepcopy(special)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RoutedLayerNorm):
                shared, cls = nn.LayerNorm(child.normalized_shape, eps=child.eps), nn.LayerNorm(child.normalized_shape, eps=child.eps)
                shared.weight, shared.bias, cls.weight, cls.bias = child.weight, child.bias, child.cls_weight, child.cls_bias
            elif isinstance(child, RoutedLayerScale):
                shared, cls = LayerScale(child.gamma.numel(), 1.0), LayerScale(child.gamma.numel(), 1.0)
                shared.gamma, cls.gamma = child.gamma, child.cls_gamma
            elif isinstance(child, RoutedLinear):
                shared, cls = nn.Linear(child.in_features, child.out_features), nn.Linear(child.in_features, child.out_features)
                shared.weight, shared.bias, cls.weight, cls.bias = child.weight, child.bias, child.cls_weight, child.cls_bias
            else:
                continue
            setattr(parent, name, SplitConcat(shared, cls, child.num_cls))
    return model


def train_step(model, opt, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def infer(model, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)


def bench(arch: str, batch: int, img: int, reps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    plain = create_vit(arch, layerscale_init=1e-4, img_size=img)
    special = specialize(copy.deepcopy(plain), "paper")
    models = {"plain": plain, "specialized": special, "naive": naive_copy(special)}
    x = torch.randn(batch, 3, img, img)
    ref = plain.eval()(x)
    for name in ("specialized", "naive"):
        torch.testing.assert_close(models[name].eval()(x), ref, rtol=0, atol=1e-4)  # same function
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-6) for k, m in models.items()}
    times = {(k, mode): [] for k in models for mode in ("train", "infer")}
    for r in range(warmup + reps):
        for k, m in models.items():
            for mode in ("train", "infer"):
                m.train(mode == "train")
                t = time.perf_counter()
                train_step(m, opts[k], x) if mode == "train" else infer(m, x)
                if r >= warmup:
                    times[(k, mode)].append(time.perf_counter() - t)
    out = {}
    for mode in ("train", "infer"):
        base = times[("plain", mode)]
        for k in models:
            ts = times[(k, mode)]
            out[(k, mode)] = (statistics.median(ts), statistics.median(t / b for t, b in zip(ts, base)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["vit_small_patch16", "vit_base_patch16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} at {args.img_size} px, "
          f"bf16 autocast, {args.reps} interleaved rounds (medians)")
    print(f"| arch | mode | plain (s) | specialized (s) | naive split+cat (s) | specialized / plain | naive / plain |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.archs:
        res = bench(arch, args.batch, args.img_size, args.reps, args.warmup)
        for mode in ("train", "infer"):
            p, s, n = res[("plain", mode)], res[("specialized", mode)], res[("naive", mode)]
            print(f"| {arch} | {mode} | {p[0]:.4f} | {s[0]:.4f} | {n[0]:.4f} | {s[1]:.3f} | {n[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
