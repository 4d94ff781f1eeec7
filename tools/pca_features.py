#!/usr/bin/env python
"""PCA feature maps of one or two backbones, as in DINOv2's figures.

    python tools/pca_features.py runs/baseline runs/paper --images a.jpg b.png --out grid.png

Each CHECKPOINT is a run directory (newest complete checkpoint; ``--which teacher`` by default
for DINOv2 runs), a DCP/DeepSpeed checkpoint, or a file written by tools/convert_checkpoint.py.
One row per image: the input, then per checkpoint the first three principal components of the
patch features as RGB (background removed) and the per-token feature-norm map.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lspretrain.convert import ConversionError, read_source
from lspretrain.data import EvalTransform
from lspretrain.eval import pca_grid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="one or two checkpoints (run dir, DCP/DeepSpeed dir, exported file)")
    ap.add_argument("--images", nargs="+", required=True, help="image files")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--which", default=None, help="teacher|student|ema|model (default: teacher when present)")
    ap.add_argument("--size", type=int, default=None, help="input resolution (default: the model's)")
    ap.add_argument("--cell", type=int, default=224, help="pixels per tile in the picture")
    args = ap.parse_args(argv)
    if len(args.checkpoints) > 2:
        ap.error("give one checkpoint, or two to compare side by side")
    start = time.perf_counter()
    models = []
    for path in args.checkpoints:
        try:
            bb = read_source(path, args.which)
        except ConversionError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        name = f"{Path(path).name} ({'plain' if bb.specialization.is_plain else 'specialized'})"
        models.append((name, bb.build().eval()))
        print(f"loaded {path} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    size = args.size or models[0][1].cfg.img_size
    transform = EvalTransform(size=size, crop_pct=1.0)
    try:
        images = [Image.open(p).convert("RGB") for p in args.images]
    except OSError as err:
        print(f"error: cannot read image: {err}", file=sys.stderr)
        return 2
    batch = torch.stack([transform(im) for im in images])
    display = torch.stack([torch.from_numpy(np.array(im.resize((size, size)))).permute(2, 0, 1) / 255.0 for im in images])
    with torch.no_grad():
        grid = pca_grid(models, batch, display=display, cell=args.cell)
    grid.save(args.out)
    print(f"wrote {args.out} ({grid.size[0]}x{grid.size[1]}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
