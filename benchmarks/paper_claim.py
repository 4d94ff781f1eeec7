"""The paper's claim at small scale: does specializing the [CLS] path improve dense features?

Pretrains the DINOv2 tiny recipe (recipes/dinov2/tiny_cpu.yaml, Fashion-MNIST) once per spec
and seed on the same budget, then scores each trained teacher with
- k-NN top-1 (k = 20, cosine) of the CLS token on Fashion-MNIST, logged along the run
  (``eval.every``) so the curve shows whether the budget was long enough to flatten it;
- the dense linear probe (lspretrain.eval.dense) on Fashion-MNIST mosaics: mIoU over 11
  classes (10 garments + background) and pixel accuracy, frozen patch tokens.
Reports mean ± std over seeds per spec, and the per-seed paired differences to the first spec.

    python benchmarks/paper_claim.py                               # none/norm/paper x 3 seeds, 600 steps: ~1 h on 2 cores
    python benchmarks/paper_claim.py --steps 20 --seeds 1 --eval-every 10 --knn-samples 500 \\
        --dense-train 100 --dense-val 50                           # a smoke run, ~2 min

At initialization the specs compute the same function (CLS copies equal the shared weights),
so the initial figures are measured once per seed, on the first spec's initial teacher.
Runs go one after the other in this process (never sharing the CPU); the data (shards under
--out/data) is built once. SIGTERM or Ctrl-C stops after the current run saved its state (exit
75); the same command then resumes it from its checkpoint (finished runs are only re-scored).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lspretrain.eval.dense import DenseEvalConfig  # noqa: E402
RECIPE = ROOT / "recipes" / "dinov2" / "tiny_cpu.yaml"
log = logging.getLogger("paper_claim")


def knn(backbone, sets) -> float:
    from lspretrain.eval import extract_features, knn_accuracy

    (xtr, ytr), (xte, yte) = (extract_features(backbone, batches) for batches in sets)
    return knn_accuracy(xtr, ytr, xte, yte, k=20, temperature=0.07)["top1"]


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "-"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/paper_claim")
    ap.add_argument("--specs", nargs="+", default=["none", "norm", "paper"])
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    ap.add_argument("--steps", type=int, default=600, help="pretraining steps per run (the demo's budget)")
    ap.add_argument("--eval-every", type=int, default=100, help="k-NN along the run every this many steps")
    ap.add_argument("--knn-samples", type=int, default=5000, help="k-NN reference and query images (each)")
    ap.add_argument("--grid", type=int, default=2, help="mosaic side in items (canvas 28 x grid px)")
    ap.add_argument("--dense-train", type=int, default=1000, help="mosaics the dense probe trains on")
    ap.add_argument("--dense-val", type=int, default=500, help="mosaics it is scored on")
    ap.add_argument("--dense-epochs", type=int, default=DenseEvalConfig.epochs)
    ap.add_argument("--dense-lr", type=float, default=DenseEvalConfig.lr)
    ap.add_argument("--json", default=None, help="results file (default: OUT/results.json)")
    ap.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. optim.lr=5e-4")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from lspretrain.data import fashion_mnist_mosaic_shards, fashion_mnist_shards
    from lspretrain.engine.config import load_config
    from lspretrain.eval.data import labelled_batches
    from lspretrain.eval.dense import DenseProbe
    from lspretrain.train import build

    out = Path(args.out)
    start = time.perf_counter()
    fm = {split: fashion_mnist_shards(str(out / "data"), split) for split in ("train", "test")}
    canvas = 28 * args.grid
    mosaic = {split: fashion_mnist_mosaic_shards(str(out / "data"), split, k=args.grid,
                                                 count=args.dense_train if split == "train" else args.dense_val)
              for split in ("train", "test")}
    # The probe at the pretraining resolution (28 px windows, 2/3 stride) over the whole canvas.
    probe = DenseProbe(DenseEvalConfig(index=mosaic["train"], val_index=mosaic["test"], resize=canvas,
                                       max_samples=args.dense_train, max_val_samples=args.dense_val,
                                       epochs=args.dense_epochs, lr=args.dense_lr))
    recipe = load_config(RECIPE, [f"data.index={fm['train']}", *args.overrides])
    knn_sets = [labelled_batches("", fm[s], recipe.method.global_crop_size, args.knn_samples, 500) for s in ("train", "test")]
    common = [f"run.total_steps={args.steps}", f"data.index={fm['train']}", f"eval.every={args.eval_every}",
              f"eval.train_index={fm['train']}", f"eval.index={fm['test']}", f"eval.max_samples={args.knn_samples}",
              "checkpoint.every=0"]
    if recipe.optim.warmup_steps > args.steps // 2:  # short smoke budgets: keep the schedule's shape
        common.append(f"optim.warmup_steps={args.steps // 10}")

    runs, initial = [], []
    for seed in range(args.seeds):
        for spec in args.specs:
            run_dir = out / f"{spec}_seed{seed}"
            cfg = load_config(RECIPE, [f"run.dir={run_dir}", f"model.spec={spec}", f"run.seed={seed}", *common,
                                       *args.overrides])
            trainer, _ = build(cfg)
            if spec == args.specs[0]:
                init = copy.deepcopy(trainer.method.teacher.backbone)
                initial.append({"seed": seed, "knn_top1": knn(init, knn_sets), **probe.evaluate(init)})
                del init
            t0 = time.perf_counter()
            result = trainer.fit()
            if result.status != "completed":  # SIGTERM/SIGINT: the run saved its state; stop, do not start the next
                print(f"{spec} seed {seed} {result.status} at step {result.step} ({result.reason}); "
                      f"the same command resumes it", file=sys.stderr)
                return 75
            teacher = trainer.method.teacher.backbone
            dense = probe.evaluate(teacher)
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
            curve = {r["step"]: r["eval/knn_top1"] for r in rows if "eval/knn_top1" in r}
            runs.append({"spec": spec, "seed": seed, "steps": result.step, "status": result.status,
                         "knn_top1": curve[max(curve)], "knn_curve": curve, "miou": dense["miou"],
                         "pixel_acc": dense["pixel_acc"], "dense": dense, "wall_s": round(time.perf_counter() - t0, 1)})
            log.info("[%s seed %d] k-NN %.2f %%, dense mIoU %.2f %% (%.0f s)", spec, seed, runs[-1]["knn_top1"],
                     dense["miou"], runs[-1]["wall_s"])

    print(f"\n=== paper claim, small scale: DINOv2 tiny recipe, {args.steps} steps, {args.seeds} seed(s), "
          f"Fashion-MNIST k-NN + {args.grid}x{args.grid} mosaic dense probe ===")
    print(f"{'':<8}{'k-NN top-1 %':>16}{'dense mIoU %':>16}{'pixel acc %':>16}")
    print(f"{'init':<8}" + "".join(f"{mean_std([r[k] for r in initial]):>16}" for k in ("knn_top1", "miou", "pixel_acc")))
    for spec in args.specs:
        mine = [r for r in runs if r["spec"] == spec]
        print(f"{spec:<8}" + "".join(f"{mean_std([r[k] for r in mine]):>16}" for k in ("knn_top1", "miou", "pixel_acc")))
    base = {r["seed"]: r for r in runs if r["spec"] == args.specs[0]}
    for spec in args.specs[1:]:
        diffs = {k: [r[k] - base[r["seed"]][k] for r in runs if r["spec"] == spec] for k in ("knn_top1", "miou")}
        print(f"{spec} - {args.specs[0]} (paired by seed): k-NN {mean_std(diffs['knn_top1'])} points, "
              f"mIoU {mean_std(diffs['miou'])} points")
    print("k-NN top-1 along the run (mean over seeds):")
    for spec in args.specs:
        curves = [r["knn_curve"] for r in runs if r["spec"] == spec]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        mean = {s: statistics.mean(c[s] for c in curves) for s in steps}
        late = [s for s in steps if s >= steps[-1] * 2 / 3]
        if len(late) > 1:
            gain = mean[late[-1]] - mean[late[0]]
            verdict = f"last third: {gain:+.2f} points, {'flat' if abs(gain) < 1 else 'still moving'}"
        else:
            verdict = "too few evaluations to judge the last third"
        print(f"  {spec:<6} " + ", ".join(f"{s}: {v:.1f}" for s, v in mean.items()) + f"   ({verdict})")
    results = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               "initial": initial, "runs": runs, "total_wall_s": round(time.perf_counter() - start, 1)}
    path = Path(args.json or out / "results.json")
    path.write_text(json.dumps(results, indent=1))
    print(f"results: {path} (total {results['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
