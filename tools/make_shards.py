#!/usr/bin/env python
"""Write WebDataset shards + index (thin CLI over lspretrain.data.shard_writer).

Examples:
  python tools/make_shards.py folder /data/imagenet/train out/ --prefix train --max-count 5000 --shuffle-seed 0
  python tools/make_shards.py csv list.csv out/ --prefix val
  python tools/make_shards.py fashion-mnist out/ --split train --resize 64 --encode jpeg
  python tools/make_shards.py index 'out/train-{000000..000009}.tar' out/train-index.json
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lspretrain.data.shard_writer import (EncodeOptions, csv_items, fashion_mnist_shards,  # noqa: E402
                                          imagefolder_items, write_shards)
from lspretrain.data.shards import ShardIndex, count_samples, expand_spec  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True)
    for name, helptext in (("folder", "ImageFolder tree: one sub-folder per class"),
                           ("csv", "CSV/TSV list of path,label"),
                           ("fashion-mnist", "Fashion-MNIST IDX files (Debian dataset-fashion-mnist)")):
        s = sub.add_parser(name, help=helptext)
        if name != "fashion-mnist":
            s.add_argument("input")
        else:
            s.add_argument("--split", choices=["train", "test"], default="train")
            s.add_argument("--data-dir", default=None)
        s.add_argument("out_dir")
        s.add_argument("--prefix", default="shard" if name != "fashion-mnist" else None)
        s.add_argument("--max-count", type=int, default=10_000, help="samples per shard at most")
        s.add_argument("--max-bytes", type=float, default=1e9, help="bytes per shard at most")
        s.add_argument("--shuffle-seed", type=int, default=None, help="shuffle inputs with this seed")
        s.add_argument("--encode", choices=["keep", "jpeg", "png"], default="keep" if name != "fashion-mnist" else "png")
        s.add_argument("--quality", type=int, default=95)
        s.add_argument("--resize", type=int, default=None, help="resize the shorter side to this")
        s.add_argument("--workers", type=int, default=os.cpu_count(), help="encoding processes")
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
    options = EncodeOptions(args.encode, args.quality, args.resize)
    if args.source == "fashion-mnist":
        path = fashion_mnist_shards(args.out_dir, args.split, data_dir=args.data_dir, options=options,
                                    max_count=args.max_count, shuffle_seed=args.shuffle_seed,
                                    num_workers=args.workers)
        print(path)
        return 0
    items, classes = imagefolder_items(args.input) if args.source == "folder" else csv_items(args.input, args.root)
    index = write_shards(items, args.out_dir, args.prefix, classes, max_count=args.max_count,
                         max_bytes=int(args.max_bytes), shuffle_seed=args.shuffle_seed, options=options,
                         num_workers=args.workers, source=f"{args.source}:{args.input}")
    print(f"{index.num_samples} samples, {len(index.shards)} shards, {len(index.skipped)} skipped")
    return 1 if not index.shards else 0


if __name__ == "__main__":
    sys.exit(main())
