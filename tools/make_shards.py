#!/usr/bin/env python
"""Write WebDataset shards + index (thin CLI over lspretrain.data.shard_writer).

Examples:
  python tools/make_shards.py folder /data/imagenet/train out/ --prefix train --max-count 5000 --shuffle-seed 0
  python tools/make_shards.py csv list.csv out/ --prefix val
  python tools/make_shards.py fashion-mnist out/ --split train --resize 64 --encode jpeg
  python tools/make_shards.py index 'out/train-{000000..000009}.tar' out/train-index.json
  # segmentation: image + PNG mask pairs (KEY.jpg|png + KEY.seg.png, 255 = ignore)
  python tools/make_shards.py segmentation out/ --ade20k /data/ADEChallengeData2016 --split validation
  python tools/make_shards.py segmentation out/ --images imgs/ --masks masks/ --num-classes 19 --prefix city-val
  python tools/make_shards.py fashion-mnist-mosaic out/ --split train --grid 2 --count 5000 --seed 0
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lspretrain.data.mosaic import fashion_mnist_mosaic_shards  # noqa: E402
from lspretrain.data.shard_writer import (ADE20K_MASKS, ADE20K_SPLITS, IGNORE_INDEX, EncodeOptions,  # noqa: E402
                                          MaskOptions, ade20k_items, csv_items, fashion_mnist_shards,
                                          imagefolder_items, segmentation_items, write_shards)
from lspretrain.data.shards import ShardIndex, count_samples, expand_spec  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True)
    for name, helptext in (("folder", "ImageFolder tree: one sub-folder per class"),
                           ("csv", "CSV/TSV list of path,label"),
                           ("fashion-mnist", "Fashion-MNIST IDX files (Debian dataset-fashion-mnist)"),
                           ("segmentation", "image + PNG mask pairs: ADE20K's layout, or an image and a mask folder"),
                           ("fashion-mnist-mosaic", "k x k Fashion-MNIST mosaics with per-pixel labels (dense task)")):
        s = sub.add_parser(name, help=helptext)
        if name in ("folder", "csv"):
            s.add_argument("input")
        elif name == "segmentation":
            s.add_argument("--ade20k", metavar="ROOT", help="ADEChallengeData2016 folder: images/SPLIT/*.jpg + "
                                                          "annotations/SPLIT/*.png, 150 classes, 0 = ignore")
            s.add_argument("--split", choices=ADE20K_SPLITS, default="training", help="with --ade20k")
            s.add_argument("--images", help="image folder (masks are paired by relative path and stem)")
            s.add_argument("--masks", help="mask folder: PNG, one class id per pixel")
            s.add_argument("--num-classes", type=int, help="with --images: class ids 0..N-1 (--ade20k: 150)")
            s.add_argument("--reduce-zero-label", action="store_true",
                           help="with --images: mask value 0 is ignore and classes start at 1 (ADE20K's convention)")
            s.add_argument("--ignore-value", type=int, default=None,
                           help=f"with --images: this mask value is ignore (written as {IGNORE_INDEX})")
            s.add_argument("--class-names", help="text file, one class name per line (default: the mask values)")
        else:
            s.add_argument("--split", choices=["train", "test"], default="train")
            s.add_argument("--data-dir", default=None)
        s.add_argument("out_dir")
        s.add_argument("--max-count", type=int, default=10_000, help="samples per shard at most")
        s.add_argument("--workers", type=int, default=os.cpu_count(), help="encoding processes")
        if name == "fashion-mnist-mosaic":  # PNG, fixed names and order: the data set is its arguments
            s.add_argument("--grid", type=int, default=2, help="k: items per canvas side (canvas 28k px)")
            s.add_argument("--count", type=int, default=None, help="mosaics (default 5000 train, 1000 test)")
            s.add_argument("--seed", type=int, default=0)
            continue
        s.add_argument("--prefix", default="shard" if name in ("folder", "csv") else None,
                       help="shard name prefix (segmentation: ade20k-SPLIT or seg)")
        s.add_argument("--max-bytes", type=float, default=1e9, help="bytes per shard at most")
        s.add_argument("--shuffle-seed", type=int, default=None, help="shuffle inputs with this seed")
        s.add_argument("--encode", choices=["keep", "jpeg", "png"], default="png" if name.startswith("fashion-mnist") else "keep")
        s.add_argument("--quality", type=int, default=95)
        s.add_argument("--resize", type=int, default=None, help="resize the shorter side to this")
        if name == "csv":
            s.add_argument("--root", default=None, help="base of relative paths (default: the list's folder)")
    s = sub.add_parser("index", help="write an index for existing shards by scanning them")
    s.add_argument("spec")
    s.add_argument("index")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    if args.source == "index":
        urls = expand_spec(args.spec)
        folder = os.path.dirname(os.path.abspath(args.index))
        shards = [{"name": os.path.relpath(u, folder), "num_samples": count_samples(u),
                   "num_bytes": os.path.getsize(u) if os.path.exists(u) else 0} for u in urls]
        ShardIndex(shards, source=f"scan:{args.spec}").save(args.index)
        print(f"indexed {sum(s['num_samples'] for s in shards)} samples in {len(shards)} shards -> {args.index}")
        return 0
    if args.source == "fashion-mnist-mosaic":
        print(fashion_mnist_mosaic_shards(args.out_dir, args.split, k=args.grid, count=args.count, seed=args.seed,
                                          data_dir=args.data_dir, max_count=args.max_count, num_workers=args.workers))
        return 0
    options = EncodeOptions(args.encode, args.quality, args.resize)
    if args.source == "fashion-mnist":
        path = fashion_mnist_shards(args.out_dir, args.split, data_dir=args.data_dir, options=options,
                                    max_count=args.max_count, shuffle_seed=args.shuffle_seed,
                                    num_workers=args.workers)
        print(path)
        return 0
    masks, rejected = None, []
    if args.source == "segmentation":
        if bool(args.ade20k) == bool(args.images or args.masks):
            p.error("segmentation: give --ade20k ROOT, or --images DIR --masks DIR --num-classes N")
        if not args.ade20k and not (args.images and args.masks and args.num_classes):
            p.error("segmentation --images needs --masks and --num-classes")
        try:
            if args.ade20k:
                items, rejected = ade20k_items(args.ade20k, args.split)
                masks, args.prefix, origin = ADE20K_MASKS, args.prefix or f"ade20k-{args.split}", args.ade20k
            else:
                items, rejected = segmentation_items(args.images, args.masks)
                masks = MaskOptions(args.num_classes, args.reduce_zero_label, args.ignore_value)
                args.prefix, origin = args.prefix or "seg", f"{args.images} {args.masks}"
            classes = []
            if args.class_names:
                with open(args.class_names) as f:
                    classes = [line.strip() for line in f if line.strip()]
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        source = f"segmentation:{origin}"
    else:
        items, classes = imagefolder_items(args.input) if args.source == "folder" else csv_items(args.input, args.root)
        source = f"{args.source}:{args.input}"
    try:
        index = write_shards(items, args.out_dir, args.prefix, classes, max_count=args.max_count,
                             max_bytes=int(args.max_bytes), shuffle_seed=args.shuffle_seed, options=options,
                             num_workers=args.workers, source=source, masks=masks, skipped=rejected)
    except ValueError as err:  # e.g. --class-names listing another number of classes
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{index.num_samples} samples, {len(index.shards)} shards, {len(index.skipped)} skipped")
    return 1 if not index.shards else 0


if __name__ == "__main__":
    sys.exit(main())
