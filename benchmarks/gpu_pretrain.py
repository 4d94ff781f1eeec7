#!/usr/bin/env python
"""Pretraining throughput of the ViT-L recipes on one GPU, in the real trainer.

    python benchmarks/gpu_pretrain.py                    # one GPU: at most --budget-s (340 s), prints the tables
    python benchmarks/gpu_pretrain.py --tiny             # CPU (CI, no GPU): tiny widths, under a minute
    python benchmarks/gpu_pretrain.py --configs dinov2:none dinov2:paper --compile off --json out.json

It writes its own synthetic shards (smooth random JPEGs, 320x256), then runs each config in a
process of its own: ``lspretrain.train.build`` on the recipe file with the benchmark's overrides
(run length, logging every step, no checkpoints or evaluation, these shards), then the trainer's
``fit()`` for ``--steps`` steps, reading ``RUN/metrics.jsonl``: median images/s, step time and
MFU over the last ``--measure`` steps. The same trainer then runs ``--phase-steps`` more steps
with ``log.phase_times`` on (a device synchronisation at every phase boundary), for where a
step's time goes: data wait, forward, backward, collectives, optimizer (clip + step), EMA.

Configs: DINOv2 ViT-L/14 (``recipes/dinov2/vitl14_*.yaml``, batch 32 per GPU) and DeiT-III
ViT-L/16 at 192 px (``recipes/deit3/vitl16_800ep_*.yaml``, batch 64), each with ``model.spec``
none, paper and paper_lora. Everything else is the recipe's (fsdp2, bf16, activation
checkpointing, compile: ``--compile`` on/off overrides it), so the figures are the recipes'.

MFU = model FLOPs / (step time x peak): the FLOPs are ``method.train_flops_per_sample()``
(``lspretrain.accounting``: forward + backward of the backbone, the DINOv2 teacher's forward;
activation-checkpointing recompute is NOT counted, nor are the DINO/iBOT heads), the peak is
``--peak-flops`` (default: the datasheet's dense bf16 for H100/H200, 989 TFLOP/s; A100 312).
A bf16 matmul on this device is also timed, and MFU against that measured peak is printed too.

The inference table times the DINOv2 ViT-L/14 backbone forward (batch 128 at 224 px, bf16
autocast, eager) plain vs ``paper`` vs ``paper_lora`` with the LoRA merged (``merge_lora``),
interleaved rounds, median of per-round ratios.

Each config may use the time of ``--budget-s`` that is left less ``--floor-s`` for each config
still to come; one that runs out is reported as such with the tail of its log, and the next
one starts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPES = {
    "dinov2": {"none": "recipes/dinov2/vitl14_baseline.yaml", "paper": "recipes/dinov2/vitl14_paper.yaml",
               "paper_lora": "recipes/dinov2/vitl14_paper_lora.yaml"},
    "deit3": {"none": "recipes/deit3/vitl16_800ep_baseline.yaml", "paper": "recipes/deit3/vitl16_800ep_paper.yaml",
              "paper_lora": "recipes/deit3/vitl16_800ep_paper.yaml"},  # + model.spec=paper_lora
}
ORDER = ["dinov2:none", "dinov2:paper", "deit3:none", "deit3:paper", "dinov2:paper_lora", "deit3:paper_lora"]
# --tiny: the same recipes at toy widths, for a CPU (CI) check that the benchmark works
TINY = {
    "dinov2": ["model.overrides.embed_dim=64", "model.overrides.depth=2", "model.overrides.num_heads=2",
               "model.overrides.img_size=28", "method.head_prototypes=256", "method.head_hidden_dim=64",
               "method.head_bottleneck_dim=32", "method.global_crop_size=28", "method.local_crop_size=14",
               "method.n_local_crops=2", "data.batch_size=4"],
    "deit3": ["model.overrides.embed_dim=64", "model.overrides.depth=2", "model.overrides.num_heads=2",
              "model.overrides.img_size=32", "data.batch_size=6"],
}
PEAKS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12}  # dense bf16, datasheets
PHASES = ("data", "forward", "backward", "collective", "optimizer", "ema")


# -- data --------------------------------------------------------------------------------------
def _smooth_image(i: int, w: int = 320, h: int = 256):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    coarse = rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    noise = rng.normal(0, 12, (h, w, 3))
    return np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)


def make_shards(out: Path, n: int, workers: int) -> str:
    """``n`` labelled JPEG images (q 90) in shards of 256 with their index; returns the spec."""
    from lspretrain.data.shard_writer import EncodeOptions, Item, write_shards

    items = [Item(f"syn{i}", i % 1000, _smooth_image(i)) for i in range(n)]
    index = write_shards(items, str(out), "train", [str(c) for c in range(1000)], max_count=256,
                         options=EncodeOptions(encode="jpeg", quality=90), num_workers=workers)
    return str(out / f"train-{{000000..{len(index.shards) - 1:06d}}}.tar")


# -- one config, in its own process --------------------------------------------------------------
def overrides(method: str, spec: str, args, run_dir: Path, shards: str, peak: float) -> list[str]:
    o = [f"run.dir={run_dir}", f"run.total_steps={args.steps}", "run.seed=0", f"model.spec={spec}",
         "log.every=1", "log.tensorboard=false", f"log.peak_flops={peak}", "log.phase_times=false",
         "checkpoint.every=0", "checkpoint.save_final=false", "checkpoint.async_save=false", "checkpoint.resume=false",
         "optim.warmup_steps=1", "eval.every=0", f"data.shards={shards}", f"data.num_workers={args.workers}"]
    if args.tiny:
        o += TINY[method] + ["run.device=cpu", "strategy.compile=false", "strategy.precision=auto"]
    elif args.compile != "recipe":
        o.append(f"strategy.compile={args.compile == 'on'}")
    return o


def run_one(args) -> None:
    """Child: build the trainer from the recipe, fit, then fit a few more steps with phase times."""
    import torch

    from lspretrain.engine.config import load_config
    from lspretrain.engine.metrics import StepTimer
    from lspretrain.train import build

    started = time.time()
    method, spec = args.run_one.split(":")
    cfg = load_config(ROOT / RECIPES[method][spec], json.loads(args.overrides))
    trainer, _ = build(cfg)
    trainer.fit()
    # The same trainer, a few more steps, each phase boundary synchronised (log.phase_times).
    trainer.cfg.log.phase_times = True
    trainer.cfg.run.total_steps += args.phase_steps
    trainer.timer = StepTimer(trainer.strategy.device, sync=True)
    trainer.logger = None  # closed by fit(); the next fit() appends to the same metrics.jsonl
    trainer.fit()
    rows = _rows(Path(cfg.run.dir) / "metrics.jsonl")
    steady = [rows[s] for s in range(args.steps - args.measure + 1, args.steps + 1)]
    phased = [rows[s] for s in range(args.steps + 2, args.steps + args.phase_steps + 1)]  # the first one re-warms

    def med(rs, key):
        vals = [r[key] for r in rs if key in r]
        return statistics.median(vals) if vals else float("nan")

    out = {
        "config": args.run_one, "spec": cfg.model.spec, "strategy": cfg.strategy.name, "precision": trainer.strategy.cfg.precision,
        "activation_checkpointing": cfg.strategy.activation_checkpointing, "compile": cfg.strategy.compile,
        "batch": trainer.global_batch, "flops_per_sample": trainer.flops_per_sample,
        "first_step_s": rows[1]["time"] - started,  # start-up, first batch, compilation
        "step_time_s": med(steady, "perf/step_time_s"), "images_per_s": med(steady, "perf/images_per_s"),
        "mfu": med(steady, "perf/mfu"), "data_wait_s": med(steady, "perf/data_time_s"),
        "peak_alloc_gib": max((r.get("memory/cuda_max_allocated_gib", 0.0) for r in rows.values()), default=0.0),
        "peak_rss_gib": max((r.get("memory/rss_gib", 0.0) for r in rows.values()), default=0.0),
        "phases_s": {p: med(phased, f"perf/{p}_s") for p in PHASES},
        "phased_step_s": med(phased, "perf/step_time_s"),
        "loss_finite": all(math.isfinite(r["train/loss"]) for r in rows.values() if "train/loss" in r),
    }
    Path(args.result).write_text(json.dumps(out))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _rows(path: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        rows.setdefault(rec["step"], {}).update(rec)
    return rows


# -- inference and the device's matmul peak ---------------------------------------------------------
def run_inference(args) -> None:
    """Child: backbone forward plain / paper / paper_lora merged, and a bf16 matmul's FLOP/s."""
    import copy

    import torch

    from lspretrain.engine.config import load_config
    from lspretrain.models import build_backbone, merge_lora, specialize

    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    cfg = load_config(ROOT / RECIPES["dinov2"]["none"], (TINY["dinov2"] if args.tiny else []) + ["data.shards=x"])
    img, batch, reps = cfg.method.global_crop_size, (8 if args.tiny else 128), (5 if args.tiny else 15)
    torch.manual_seed(0)
    plain = build_backbone(cfg.model.arch, "none", **cfg.model.overrides)
    models = {"none": plain, "paper": specialize(copy.deepcopy(plain), "paper"),
              "paper_lora merged": merge_lora(specialize(copy.deepcopy(plain), "paper_lora"))}
    models = {k: m.to(dev).eval() for k, m in models.items()}
    x = torch.randn(batch, 3, img, img, device=dev)

    def timed(fn) -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        for r in range(reps + 2):
            for k, m in models.items():
                t = timed(lambda: m(x))
                if r >= 2:
                    times[k].append(t)
        peak = None
        if cuda:
            a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
            for _ in range(3):
                a @ a
            peak = 2 * 8192**3 * 10 / timed(lambda: [a @ a for _ in range(10)])
    out = {"batch": batch, "img": img, "matmul_flops": peak,
           "median_s": {k: statistics.median(v) for k, v in times.items()},
           "ratio": {k: statistics.median(t / b for t, b in zip(v, times["none"])) for k, v in times.items()}}
    Path(args.result).write_text(json.dumps(out))


# -- the driver ----------------------------------------------------------------------------------
def child(cmd: list[str], timeout: float, log: Path) -> tuple[bool, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=ROOT).returncode
            why = "" if rc == 0 else f"exit status {rc}"
        except subprocess.TimeoutExpired:
            why = f"out of time after {timeout:.0f} s"
    return not why, why


def default_peak(tiny: bool) -> float:
    import torch

    if tiny or not torch.cuda.is_available():
        return 1e12  # a CPU check: MFU against a nominal 1 TFLOP/s
    name = torch.cuda.get_device_name(0)
    for key, value in PEAKS.items():
        if key in name:
            return value
    raise SystemExit(f"no datasheet peak known for {name!r}: pass --peak-flops (dense bf16 FLOP/s)")


def fmt(v, pattern: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else pattern.format(v)


def report(results: dict, inference: dict | None, peak: float, args) -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else f"CPU, {os.cpu_count()} cores"
    lines = [f"gpu_pretrain: {time.strftime('%Y-%m-%d')}, device {device}, "
             f"torch {torch.__version__}, peak {peak / 1e12:.0f} TFLOP/s (MFU column)"
             + (f", measured bf16 matmul {inference['matmul_flops'] / 1e12:.0f} TFLOP/s (MFU* column)"
                if inference and inference.get("matmul_flops") else ""),
             f"steps {args.steps}, medians of the last {args.measure}; phases: {args.phase_steps} more steps with "
             "log.phase_times (synchronised); MFU without activation-checkpointing recompute and without the heads", "",
             "| config | AC | compile | batch | images/s | step s | MFU | MFU* | peak GiB | data wait s | first step s | vs none |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    matmul = inference.get("matmul_flops") if inference else None
    for name in ORDER:
        if name not in results:
            continue
        r = results[name]
        if "error" in r:
            lines.append(f"| {name} | {r['error']} |" + " |" * 10)
            continue
        base = results.get(name.split(":")[0] + ":none", {})
        ratio = r["step_time_s"] / base["step_time_s"] if base.get("step_time_s") else None
        mfu_star = r["mfu"] * peak / matmul if matmul and r.get("mfu") == r.get("mfu") else None
        lines.append(f"| {name} | {r['activation_checkpointing']} | {r['compile']} | {r['batch']} | {fmt(r['images_per_s'], '{:.1f}')} "
                     f"| {fmt(r['step_time_s'], '{:.3f}')} | {fmt(r['mfu'], '{:.1%}')} | {fmt(mfu_star, '{:.1%}')} "
                     f"| {fmt(r['peak_alloc_gib'], '{:.1f}')} | {fmt(r['data_wait_s'], '{:.3f}')} | {fmt(r['first_step_s'], '{:.0f}')} "
                     f"| {fmt(ratio, '{:.3f}')} |")
    lines += ["", "Where a step goes (seconds per step, synchronised at each phase):", "",
              "| config | " + " | ".join(PHASES) + " | sum | step |", "|---" * (len(PHASES) + 3) + "|"]
    for name in ORDER:
        r = results.get(name)
        if r and "phases_s" in r:
            ph = r["phases_s"]
            total = sum(v for v in ph.values() if v == v)
            lines.append(f"| {name} | " + " | ".join(fmt(ph[p], "{:.4f}") for p in PHASES)
                         + f" | {total:.4f} | {fmt(r['phased_step_s'], '{:.4f}')} |")
    if inference:
        lines += ["", f"Inference, DINOv2 ViT-L/14 backbone{' (--tiny widths)' if args.tiny else ''}, batch {inference['batch']} at {inference['img']} px, bf16, eager:", "",
                  "| model | median s | / none |", "|---|---|---|"]
        for k, v in inference["median_s"].items():
            lines.append(f"| {k} | {v:.4f} | {inference['ratio'][k]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy widths on the CPU: checks that the benchmark works")
    ap.add_argument("--configs", nargs="+", default=ORDER, choices=ORDER)
    ap.add_argument("--steps", type=int, default=None, help="steps per config (default 16; --tiny 4)")
    ap.add_argument("--measure", type=int, default=None, help="last steps the medians cover (default 8; --tiny 2)")
    ap.add_argument("--phase-steps", type=int, default=None, help="extra steps with phase times (default 4; --tiny 2)")
    ap.add_argument("--compile", choices=["recipe", "on", "off"], default="recipe")
    ap.add_argument("--peak-flops", type=float, default=None, help="per-device dense bf16 FLOP/s for MFU")
    ap.add_argument("--workers", type=int, default=None, help="data.num_workers (default: CPUs - 2, at most 14)")
    ap.add_argument("--images", type=int, default=None, help="synthetic images (default 2048; --tiny 64)")
    ap.add_argument("--budget-s", type=float, default=340.0, help="wall time for everything together")
    ap.add_argument("--floor-s", type=float, default=40.0, help="time kept for each config still to run")
    ap.add_argument("--no-inference", action="store_true")
    ap.add_argument("--json", default=None, help="also write every figure here")
    ap.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--inference-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or (4 if args.tiny else 16)
    args.measure = args.measure or (2 if args.tiny else 8)
    args.phase_steps = args.phase_steps or (2 if args.tiny else 4)
    args.workers = args.workers if args.workers is not None else (0 if args.tiny else max(1, min(14, (os.cpu_count() or 4) - 2)))
    if args.measure >= args.steps:
        raise SystemExit(f"--measure {args.measure} must be below --steps {args.steps} (the first step warms up)")
    if args.run_one:
        return run_one(args)
    if args.inference_only:
        return run_inference(args)

    t0 = time.time()
    peak = args.peak_flops or default_peak(args.tiny)
    work = Path(tempfile.mkdtemp(prefix="gpu_pretrain_"))
    shards = make_shards(work / "shards", args.images or (64 if args.tiny else 2048), min(16, os.cpu_count() or 1))
    print(f"shards: {shards} ({time.time() - t0:.0f} s)", flush=True)
    inference = None
    if not args.no_inference:
        res = work / "inference.json"
        ok, why = child([sys.executable, __file__, "--inference-only", f"--result={res}"] + (["--tiny"] if args.tiny else []),
                        120, work / "inference.log")
        inference = json.loads(res.read_text()) if ok else None
        print(f"inference: {inference['ratio'] if ok else why}", flush=True)
    results: dict[str, dict] = {}
    configs = [c for c in ORDER if c in args.configs]
    for i, name in enumerate(configs):
        # all the time left, less a floor kept for each config still to come
        left = args.budget_s - (time.time() - t0)
        timeout = max(left - args.floor_s * (len(configs) - i - 1), args.floor_s)
        method, spec = name.split(":")
        run_dir, res, log = work / name.replace(":", "_"), work / f"{name.replace(':', '_')}.json", work / f"{name.replace(':', '_')}.log"
        o = overrides(method, spec, args, run_dir, shards, peak)
        cmd = [sys.executable, __file__, f"--run-one={name}", f"--overrides={json.dumps(o)}", f"--result={res}",
               f"--steps={args.steps}", f"--measure={args.measure}", f"--phase-steps={args.phase_steps}"]
        ok, why = child(cmd, timeout, log)
        if ok:
            results[name] = json.loads(res.read_text())
            r = results[name]
            print(f"{name}: {r['images_per_s']:.1f} images/s, step {r['step_time_s']:.3f} s, MFU {r['mfu']:.1%}, "
                  f"first step {r['first_step_s']:.0f} s", flush=True)
        else:
            results[name] = {"error": why}
            tail = log.read_text().splitlines()[-25:] if log.exists() else []
            print(f"{name}: FAILED ({why}); last lines of its log:\n  " + "\n  ".join(tail), flush=True)
    text = report(results, inference, peak, args)
    print("\n" + text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "inference": inference, "peak_flops": peak,
                                               "args": vars(args), "report": text}, indent=1))
    print(f"total {time.time() - t0:.0f} s", flush=True)
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
