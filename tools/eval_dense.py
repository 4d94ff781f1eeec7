#!/usr/bin/env python
"""Dense linear probe of a frozen backbone: mIoU, pixel accuracy and per-class IoU (lspretrain.eval.dense).

RUN_OR_BACKBONE is a run directory (newest complete checkpoint; teacher by default for DINOv2
runs), a DCP/DeepSpeed checkpoint, a file written by tools/convert_checkpoint.py, or with
--from a released plain checkpoint (timm/dinov2/hf), optionally specialized with --spec.
--train/--val take a shard spec or an index (``*-index.json``) of segmentation shards
(tools/make_shards.py segmentation | fashion-mnist-mosaic).

Examples:
  python tools/eval_dense.py runs/demo/dinov2_tiny_paper --train data/fashion-mnist-mosaic2-train-index.json \\
      --val data/fashion-mnist-mosaic2-test-index.json --resize 56 --out dense.json
  python tools/eval_dense.py dinov2_vitl14_pretrain.pth --from dinov2 --train 'ade/ade20k-training-{000000..000002}.tar' \\
      --val ade/ade20k-validation-index.json --img-size 518 --stride 341 --layers 4 --use-cls
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, fields

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lspretrain.convert import IMPORT_FORMATS, ConversionError, read_released, read_source  # noqa: E402
from lspretrain.data.errors import DataError  # noqa: E402
from lspretrain.eval.dense import DenseEvalConfig, evaluate_dense  # noqa: E402
from lspretrain.models import PRESETS  # noqa: E402


def _split(value: str) -> dict:
    """A shard spec or an index file, as DenseEvalConfig's (shards, index) pair."""
    return {"index": value} if value.endswith(".json") else {"shards": value}


def table(metrics: dict[str, float]) -> str:
    rows = [(k[len("iou/"):], v) for k, v in metrics.items() if k.startswith("iou/")]
    width = max([len(name) for name, _ in rows] + [len("pixel accuracy")])
    lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 9)]
    lines += [f"{name:<{width}}  {v:7.2f}" for name, v in rows]
    lines += ["-" * (width + 9), f"{'mIoU':<{width}}  {metrics['miou']:7.2f}",
              f"{'pixel accuracy':<{width}}  {metrics['pixel_acc']:7.2f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("backbone", metavar="RUN_OR_BACKBONE")
    ap.add_argument("--train", required=True, help="the probe's training split: shard spec or *-index.json")
    ap.add_argument("--val", required=True, help="the split it is scored on: shard spec or *-index.json")
    ap.add_argument("--from", dest="from_", choices=IMPORT_FORMATS, help="read the backbone as a released plain checkpoint")
    ap.add_argument("--spec", choices=list(PRESETS), help="with --from: specialize it first (CLS copies = shared weights)")
    ap.add_argument("--which", choices=("teacher", "student", "ema", "model"), help="backbone of a training checkpoint")
    ap.add_argument("--out", help="write the metrics and settings as JSON here")
    ap.add_argument("--device", default="cpu")
    d = DenseEvalConfig()
    ap.add_argument("--layers", type=int, choices=(1, 4), default=d.layers, help="last block, or last four concatenated")
    ap.add_argument("--use-cls", action="store_true", help="concatenate the CLS token to every patch token")
    ap.add_argument("--img-size", type=int, default=d.img_size, help="window side in px (default: the model's)")
    ap.add_argument("--resize", type=int, default=d.resize, help="shorter image side before windowing (default: the window)")
    ap.add_argument("--stride", type=int, default=d.stride, help="evaluation window stride (default: 2/3 of the window)")
    ap.add_argument("--num-classes", type=int, default=d.num_classes, help="default: as many as the index names")
    for key in ("epochs", "batch_size", "lr", "weight_decay", "max_samples", "max_val_samples", "cache_gib", "seed"):
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(getattr(d, key)), default=getattr(d, key))
    args = ap.parse_args(argv)
    if args.spec and not args.from_:
        ap.error("--spec specializes an imported checkpoint: it needs --from")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    train, val = _split(args.train), _split(args.val)
    given = {f.name: getattr(args, f.name) for f in fields(DenseEvalConfig) if hasattr(args, f.name)}
    cfg = DenseEvalConfig(**{**given, **train, **{f"val_{k}": v for k, v in val.items()}})
    start = time.perf_counter()
    try:
        if args.from_:
            bb = read_released(args.backbone, args.from_, args.spec, args.which)
        else:
            bb = read_source(args.backbone, args.which)
        backbone = bb.build().to(args.device)
        print(f"loaded {bb.source} ({'plain' if bb.specialization.is_plain else 'specialized'}) in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        metrics = evaluate_dense(backbone, cfg, args.device)
    except (ConversionError, DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(metrics))
    if args.out:
        result = {"backbone": args.backbone, "source": bb.source, "metrics": metrics, "config": asdict(cfg),
                  "wall_time_s": round(time.perf_counter() - start, 1)}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
