"""DeiT-III tiny recipe (recipes/deit3/tiny_fashion_mnist.yaml), plain ViT vs the paper's
specialization, side by side: validation top-1/top-5 after the recipe's budget, training
images/s (median of the logged windows) and wall time.

    python benchmarks/deit3_tiny.py                        # both specs, ~5 minutes on 2 cores
    python benchmarks/deit3_tiny.py --specs paper --steps 300 --out /tmp/deit3_bench

Shards come from Debian's dataset-fashion-mnist (written once under --out). Each spec runs in
its own process, one after the other, so they never share the CPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "deit3" / "tiny_fashion_mnist.yaml"


def run_spec(spec: str, out: Path, indexes: dict[str, str], extra: list[str]) -> dict:
    run_dir = out / f"run_{spec}"
    cmd = [sys.executable, "-m", "lspretrain.train", str(RECIPE), f"run.dir={run_dir}", f"model.spec={spec}",
           f"data.index={indexes['train']}", f"eval.index={indexes['test']}", "checkpoint.save_final=false",
           "checkpoint.every=0", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/top1" in r]
    rates = [r["perf/images_per_s"] for r in rows if "perf/images_per_s" in r][1:]  # the first window has warm-up
    return {"spec": spec, "step": evals[-1]["step"], "top1": evals[-1]["eval/top1"], "top5": evals[-1]["eval/top5"],
            "curve": {r["step"]: r["eval/top1"] for r in evals}, "images_per_s": statistics.median(rates), "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/lspretrain_deit3_bench")
    parser.add_argument("--specs", nargs="+", default=["none", "paper"])
    parser.add_argument("--steps", type=int, default=None, help="override run.total_steps")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from lspretrain.data.shard_writer import fashion_mnist_shards

    out = Path(args.out)
    indexes = {split: fashion_mnist_shards(str(out / "shards"), split) for split in ("train", "test")}
    extra = [f"run.total_steps={args.steps}", f"eval.every={args.steps}"] if args.steps else []
    results = []
    for spec in args.specs:
        print(f"running spec={spec} ...", flush=True)
        results.append(run_spec(spec, out, indexes, extra))

    print(f"\nDeiT-III tiny recipe on Fashion-MNIST ({results[0]['step']} steps, test top-1 on 2,000 images)")
    print(f"{'spec':<8}{'top-1 %':>9}{'top-5 %':>9}{'img/s':>9}{'wall s':>9}   top-1 along the run")
    for r in results:
        curve = ", ".join(f"{s}: {v:.1f}" for s, v in r["curve"].items())
        print(f"{r['spec']:<8}{r['top1']:>9.2f}{r['top5']:>9.2f}{r['images_per_s']:>9.0f}{r['wall_s']:>9.0f}   {curve}")
    if len(results) == 2:
        a, b = results
        print(f"{b['spec']} / {a['spec']}: top-1 {b['top1'] - a['top1']:+.2f} points, "
              f"images/s x{b['images_per_s'] / a['images_per_s']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
