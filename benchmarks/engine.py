"""Engine benchmark: step time per strategy on 2 gloo ranks, and the training-loop stall of a
checkpoint save, synchronous vs asynchronous (DCP async_save).

    python benchmarks/engine.py                       # defaults below, ~3-4 minutes on 2 cores
    python benchmarks/engine.py --steps 40 --json out.json

Each configuration runs in fresh processes (torch.multiprocessing spawn, 1 thread per rank)
on synthetic data; medians skip the first ``--warmup`` steps. The stall is the time the loop
is blocked inside ``CheckpointManager.save``; the asynchronous save's writes go on in a
background thread, so the steps right after it are reported too ("next step").
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch.multiprocessing as mp

STRATEGIES = {
    "single (1 rank)": ({"name": "single"}, 1),
    "ddp": ({"name": "ddp"}, 2),
    "fsdp2": ({"name": "fsdp2"}, 2),
    "deepspeed zero1": ({"name": "deepspeed", "deepspeed": {"stage": 1}}, 2),
    "deepspeed zero2": ({"name": "deepspeed", "deepspeed": {"stage": 2}}, 2),
    "deepspeed zero3": ({"name": "deepspeed", "deepspeed": {"stage": 3}}, 2),
}


def make_recipe(run_dir: str, strategy: dict, args, arch: str, overrides: dict, steps: int, ckpt_every: int, async_save: bool) -> dict:
    return {
        "run": {"dir": run_dir, "seed": 0, "total_steps": steps},
        "model": {"arch": arch, "spec": "paper", "overrides": {"layerscale_init": 1e-4, **overrides}},
        "method": {"name": "classification", "num_classes": 10},
        "optim": {"name": "adamw", "lr": 1e-3, "warmup_steps": 2, "clip_grad": 3.0},
        "strategy": {"precision": args.precision, **strategy},
        "checkpoint": {"every": ckpt_every, "keep_last": 2, "async_save": async_save, "save_final": False, "resume": False},
        "log": {"every": 1, "tensorboard": False},
        "data_source": "synthetic",
        "synthetic": {"batch_size": args.batch, "img_size": overrides["img_size"], "num_classes": 10},
    }


class _Collect:
    """Logger stand-in keeping each step's scalars in memory."""

    def __init__(self):
        self.rows = {}

    def log(self, step, scalars, images=None, tokens=None):
        self.rows[step] = dict(scalars)

    def close(self):
        pass


def _worker(rank: int, world_size: int, port: int, recipe: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    from lspretrain.engine.config import load_config
    from lspretrain.engine.dist import shutdown
    from lspretrain.train import build

    trainer, env = build(load_config(recipe))
    trainer.logger = _Collect()
    trainer.fit()
    if env.rank == 0:
        step_time = {s: r["perf/data_time_s"] + r["perf/compute_time_s"] for s, r in trainer.logger.rows.items()}
        Path(out).write_text(json.dumps({"step_time": step_time, "stalls": trainer.save_stalls}))
    sys.stdout.flush()
    shutdown(0)  # leaves before DeepSpeed's C++ teardown


def run(recipe: dict, world_size: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(recipe["run"]["dir"]) / "bench.json"
    Path(recipe["run"]["dir"]).mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world_size, port, recipe, str(out)), nprocs=world_size, join=True)
    res = json.loads(out.read_text())
    res["step_time"] = {int(k): v for k, v in res["step_time"].items()}
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="images per rank")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--arch", default="vit_tiny_patch16")
    p.add_argument("--img", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--ckpt-arch", default="vit_small_patch16", help="model of the checkpoint-stall measurement")
    p.add_argument("--ckpt-saves", type=int, default=4)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="lsp-bench-")
    results = {"step_time": {}, "checkpoint": {}}

    model = {"img_size": args.img, "depth": args.depth}
    print(f"step time: {args.arch} depth {args.depth} at {args.img} px, batch {args.batch}/rank, {args.precision}", flush=True)
    for label, (strategy, world_size) in STRATEGIES.items():
        res = run(make_recipe(f"{tmp}/{label.replace(' ', '_')}", strategy, args, args.arch, model, args.steps, 0, False), world_size)
        times = [t for s, t in sorted(res["step_time"].items()) if s > args.warmup]
        results["step_time"][label] = {"ranks": world_size, "median_s": statistics.median(times),
                                       "images_per_s": args.batch * world_size / statistics.median(times)}
        print(f"  {label}: {statistics.median(times) * 1e3:.1f} ms", flush=True)

    every = 3
    steps = every * args.ckpt_saves + 2
    ckpt_model = {"img_size": args.img}
    for mode in ("sync", "async"):
        res = run(make_recipe(f"{tmp}/ckpt_{mode}", {"name": "fsdp2"}, args, args.ckpt_arch, ckpt_model, steps, every, mode == "async"), 2)
        save_steps = [s for s in res["step_time"] if s % every == 0 and s < steps]
        after = [res["step_time"][s + 1] for s in save_steps]
        plain = [t for s, t in res["step_time"].items() if s > 2 and s % every not in (0, 1)]
        results["checkpoint"][mode] = {"stall_median_s": statistics.median(res["stalls"]), "stalls_s": res["stalls"],
                                       "next_step_median_s": statistics.median(after), "plain_step_median_s": statistics.median(plain)}
        print(f"  checkpoint {mode}: stall {statistics.median(res['stalls']) * 1e3:.1f} ms", flush=True)

    st, ck = results["step_time"], results["checkpoint"]
    print("\n| strategy | ranks | step time (median) | images/s |\n|---|---|---|---|")
    for label, r in st.items():
        print(f"| {label} | {r['ranks']} | {r['median_s'] * 1e3:.1f} ms | {r['images_per_s']:.1f} |")
    print(f"\nCheckpoint stall, fsdp2 on 2 ranks, {args.ckpt_arch} (model + AdamW state), median of {args.ckpt_saves} saves:")
    print("| save | loop blocked | next step | plain step |\n|---|---|---|---|")
    for mode, r in ck.items():
        print(f"| {mode} | {r['stall_median_s'] * 1e3:.1f} ms | {r['next_step_median_s'] * 1e3:.1f} ms | {r['plain_step_median_s'] * 1e3:.1f} ms |")
    ratio = ck["async"]["stall_median_s"] / ck["sync"]["stall_median_s"]
    print(f"\nasync stall / sync save time = {ratio:.1%} (goal <= 10 %)")
    results["async_over_sync"] = ratio
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
