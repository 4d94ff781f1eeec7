#!/usr/bin/env python
"""Convert a backbone between lspretrain checkpoints and external formats (lspretrain.convert).

Runs on one CPU process, no process group. See docs/CONVERT.md for what each format holds.

Examples:
  # newest complete checkpoint of a run (fsdp2/DCP or DeepSpeed), teacher backbone, to HF
  python tools/convert_checkpoint.py runs/dinov2_vitl --to hf --out out/hf_vitl --which teacher
  python tools/convert_checkpoint.py runs/x/checkpoints/step_001000 --to safetensors --out vitl.safetensors
  python tools/convert_checkpoint.py vitl.safetensors --to onnx --out vitl.onnx
  # a released plain checkpoint into our ViT, specialized, for a recipe's init_from
  python tools/convert_checkpoint.py dinov2_vitl14_pretrain.pth --from dinov2 --spec paper --to torch --out init.pt
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lspretrain.convert import EXPORT_FORMATS, IMPORT_FORMATS, ConversionError, read_released, read_source, write  # noqa: E402
from lspretrain.models import PRESETS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="run directory, DCP or DeepSpeed checkpoint directory, our .pt/.safetensors, "
                                  "or with --from a released checkpoint (file, or HF directory)")
    p.add_argument("--to", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--out", required=True, help="output file (hf: a directory)")
    p.add_argument("--from", dest="from_", choices=IMPORT_FORMATS, help="read SOURCE as a released plain checkpoint")
    p.add_argument("--spec", choices=list(PRESETS), help="with --from: specialize the imported backbone")
    p.add_argument("--which", choices=("teacher", "student", "ema", "model"),
                   help="backbone to take from a training checkpoint (default: the only one, else teacher, else ema)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--num-heads", type=int, help="when no config says it: attention heads (default width/64)")
    p.add_argument("--allow-equal-cls", action="store_true",
                   help="timm/dinov2/hf: convert a specialized backbone whose CLS parameters all still "
                        "equal the shared ones (checked exactly), dropping them")
    args = p.parse_args(argv)
    if args.spec and not args.from_:
        p.error("--spec specializes an imported checkpoint: it needs --from")

    start = time.monotonic()
    print(f"reading {args.source} ...", file=sys.stderr, flush=True)
    try:
        if args.from_:
            bb = read_released(args.source, args.from_, args.spec, args.which, args.num_heads)
        else:
            bb = read_source(args.source, args.which, args.num_heads)
        print(f"read {len(bb.state_dict)} tensors from {bb.source} in {time.monotonic() - start:.1f} s; "
              f"writing {args.to} ...", file=sys.stderr, flush=True)
        summary = write(bb, args.to, args.out, args.dtype, args.allow_equal_cls)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary)
    print(f"done in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
