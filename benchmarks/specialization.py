#!/usr/bin/env python
"""Step time of specialized vs plain ViTs, and of our routed layers vs the naive way.

    python benchmarks/specialization.py [--archs vit_small_patch16 vit_base_patch16] [--reps 15]
    python benchmarks/specialization.py --kernels --archs vit_small_patch16   # compiled block: kernel counts
    python benchmarks/specialization.py --trainer-ops [--ac none --keep-gathered]   # aten calls per step phase
    python benchmarks/specialization.py --trainer-time 3 [--ac none --keep-gathered]  # that step's wall time

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
from pathlib import Path

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


def _eager_forms() -> dict:
    """The routed LayerNorm / LayerScale forwards as eager code runs them (the autograd Function,
    the per-token table), to compile them as they are instead of their traced forms."""
    from lspretrain.models.specialize import RoutedLayerNormFunction, _per_token

    def norm(self, x):
        p = (q.to(x.dtype) for q in (self.weight, self.bias, self.cls_weight, self.cls_bias))
        return RoutedLayerNormFunction.apply(x, *p, self.num_cls, self.eps)

    def scale(self, x):
        return x * _per_token(self.cls_gamma, self.gamma, self.num_cls, x.shape[-2]).to(x.dtype)

    return {RoutedLayerNorm: norm, RoutedLayerScale: scale}


def kernels(arch: str, img: int, batch: int) -> None:
    """Kernels inductor generates for one block's forward + backward (bf16 autocast), per preset,
    the routed layers in their traced form (what training compiles) and in their eager form."""
    from torch._inductor import metrics

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"inductor kernels of block 0, forward + backward, {arch} at {img} px, batch {batch}, {device}")
    print("| preset | routed forms | generated kernels |\n|---|---|---|")
    variants = [("none", "-"), ("paper", "traced (torch.where)"), ("paper", "eager (Function, table)"),
                ("paper_lora", "traced (torch.where)")]
    for preset, forms in variants:
        torch.manual_seed(0)
        model = create_vit(arch, layerscale_init=1e-4, img_size=img)
        model = (specialize(model, preset) if preset != "none" else model).to(device)
        saved = {cls: cls.forward for cls in (RoutedLayerNorm, RoutedLayerScale)}
        if forms.startswith("eager"):
            for cls, fwd in _eager_forms().items():
                cls.forward = fwd
        try:
            torch._dynamo.reset()
            metrics.reset()
            x = torch.randn(batch, (img // model.cfg.patch_size) ** 2 + 1, model.embed_dim, device=device, requires_grad=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                y = torch.compile(model.blocks[0])(x)
            y.float().sum().backward()
        finally:
            for cls, fwd in saved.items():
                cls.forward = fwd
        print(f"| {preset} | {forms} | {metrics.generated_kernel_count} |", flush=True)


def _shards() -> str:
    """A folder with 32 random 64-px PNG images in one shard (s-000000.tar)."""
    import tempfile

    import numpy as np

    from lspretrain.data.shard_writer import EncodeOptions, Item, write_shards

    work = tempfile.mkdtemp()
    rng = np.random.default_rng(0)
    write_shards([Item(f"i{i}", 0, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for i in range(32)], work, "s",
                 ["0"], options=EncodeOptions(encode="png"), num_workers=1)
    return work


def _step_recipe(work: str, preset: str, ac: str, reshard: bool, steps: int = 10) -> dict:
    """The --trainer-ops / --trainer-time run: DINOv2, ViT width 192 depth 6, 2 x 56 + 8 x 28 px
    crops, batch 8, fsdp2 on one gloo rank, bf16."""
    recipe = {
        "run": {"dir": f"{work}/run_{preset}", "total_steps": steps, "device": "cpu"},
        "model": {"arch": "vit_small_patch14", "spec": preset, "overrides": {"img_size": 56, "embed_dim": 192, "depth": 6,
                  "num_heads": 3, "drop_path_rate": 0.4, "drop_path_uniform": True}},
        "method": {"name": "dinov2", "head_prototypes": 1024, "head_hidden_dim": 256, "head_bottleneck_dim": 64,
                   "ibot_separate_head": True, "global_crop_size": 56, "local_crop_size": 28, "n_local_crops": 8,
                   "freeze_last_layer_steps": 1},
        "optim": {"lr": 1e-4, "warmup_steps": 1},
        "strategy": {"name": "fsdp2", "precision": "bf16", "activation_checkpointing": ac,
                     "fsdp": {"reshard_after_forward": reshard}},
        "checkpoint": {"every": 0, "save_final": False, "resume": False},
        "log": {"tensorboard": False},
        "data": {"shards": f"{work}/s-000000.tar", "mode": "resampled", "batch_size": 8, "num_workers": 0,
                 "require_label": False},
    }
    return recipe


def trainer_ops(presets: list[str], ac: str, reshard: bool) -> None:
    """aten operator calls in one DINOv2 training step of the real strategy (fsdp2 on one gloo
    rank, bf16), per phase: on a GPU each is a kernel launch or a dispatch, so when a step is
    launch-bound (ViT-L at batch 32 on an H100/H200) its time follows these counts."""
    from torch.profiler import ProfilerActivity, profile

    from lspretrain.engine.config import load_config
    from lspretrain.train import build

    work = _shards()

    def count(fn):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = fn()
        return out, sum(e.count for e in prof.key_averages() if e.key.startswith(("aten::", "c10d::")))

    print(f"aten calls per DINOv2 step: ViT width 192, depth 6, 2 x 56 px + 8 x 28 px crops, batch 8, fsdp2 (1 rank), "
          f"bf16, activation checkpointing {ac}, reshard_after_forward {reshard}")
    print("| preset | forward | backward | clip + optimizer | EMA | total |\n|---|---|---|---|---|---|")
    for preset in presets:
        recipe = _step_recipe(work, preset, ac, reshard)
        trainer, _ = build(load_config(recipe))
        s = trainer.strategy
        batches = iter(trainer.loader)
        for _ in range(3):  # the counts of the third step (the first ones allocate state)
            batch = s.prepare_batch(next(batches))
            with s.micro_step(last=True):
                (loss, _), fwd = count(lambda: s.forward(batch, 5))
                _, bwd = count(lambda: s.backward(loss))
            _, opt = count(lambda: s.clip_and_step(3.0, skip=False))
            _, ema = count(lambda: trainer.method.after_step(5, s))
        print(f"| {preset} | {fwd} | {bwd} | {opt} | {ema} | {fwd + bwd + opt + ema} |", flush=True)


def trainer_time(presets: list[str], ac: str, reshard: bool, rounds: int) -> None:
    """Wall time of the same DINOv2 fsdp2 step in the trainer's ``fit()`` (``perf/step_time_s`` of
    steps 4-12), the presets interleaved round by round, each run in a process of its own."""
    import json
    import subprocess
    import sys

    work = _shards()
    times: dict[str, list[float]] = {p: [] for p in presets}
    for r in range(rounds):
        for preset in presets:
            run = f"{work}/time_{preset}_{r}"
            code = ("import sys, json, torch; from lspretrain.engine.config import load_config; "
                    "from lspretrain.train import build; torch.set_num_threads(2); "
                    "sys.path.insert(0, sys.argv[1]); import specialization as S; "
                    "recipe = S._step_recipe(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == '1', steps=12); "
                    "recipe['run']['dir'] = sys.argv[6]; recipe['log']['every'] = 1; build(load_config(recipe))[0].fit()")
            subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), work, preset, ac, "1" if reshard else "0", run],
                           check=True, capture_output=True)
            rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
            times[preset] += [row["perf/step_time_s"] for row in rows if row["step"] >= 4 and "perf/step_time_s" in row]
    base = statistics.median(times[presets[0]])
    print(f"fsdp2 DINOv2 step (--trainer-ops configuration), AC {ac}, reshard_after_forward {reshard}, "
          f"{rounds} interleaved rounds x steps 4-12")
    for preset, ts in times.items():
        print(f"{preset}: median {statistics.median(ts) * 1e3:.1f} ms over {len(ts)} steps, "
              f"/ {presets[0]} {statistics.median(ts) / base:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["vit_small_patch16", "vit_base_patch16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--kernels", action="store_true", help="count inductor kernels of a compiled block instead")
    ap.add_argument("--trainer-ops", action="store_true", help="count aten calls per phase of a DINOv2 fsdp2 step instead")
    ap.add_argument("--ac", default="full", help="--trainer-ops: activation checkpointing")
    ap.add_argument("--keep-gathered", action="store_true", help="--trainer-ops: strategy.fsdp.reshard_after_forward false")
    ap.add_argument("--trainer-time", type=int, default=0, metavar="ROUNDS",
                    help="time the --trainer-ops step in the trainer, none vs paper, this many rounds")
    args = ap.parse_args()
    if args.trainer_time:
        return trainer_time(["none", "paper"], args.ac, not args.keep_gathered, args.trainer_time)
    if args.trainer_ops:
        return trainer_ops(["none", "paper", "paper_lora"], args.ac, not args.keep_gathered)
    if args.kernels:
        return kernels(args.archs[0], args.img_size, args.batch)
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
