#!/usr/bin/env python
"""Parameter and FLOP accounting of a (specialized) ViT, as Markdown or JSON.

    python tools/report.py --arch vit_large_patch14 --spec paper --img-size 224 98 --compare none
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from lspretrain.accounting import format_markdown, report
from lspretrain.models import PRESETS, VIT_ARCHS


def parse_value(text: str):
    """``key=value`` overrides: ints, floats, booleans and None are parsed, the rest is a string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None, "null": None}.get(text.lower(), text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_large_patch14", choices=sorted(VIT_ARCHS))
    ap.add_argument("--spec", default="paper", help=f"specialization preset: {', '.join(PRESETS)}")
    ap.add_argument("--compare", default=None, help="a second preset to put side by side (e.g. none)")
    ap.add_argument("--img-size", type=int, nargs="+", default=[224], help="resolutions, e.g. 224 98 (DINOv2 global and local crops)")
    ap.add_argument("--format", choices=("md", "json"), default="md")
    ap.add_argument("--out", default=None, help="write here instead of stdout")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="ViT config override, repeatable: --set num_registers=4 --set layerscale_init=1e-4")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"override {item!r} is not key=value")
        overrides[key] = parse_value(value)
    start = time.perf_counter()
    try:
        rep = report(args.arch, args.spec, tuple(args.img_size), compare=args.compare, **overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(rep, indent=2) if args.format == "json" else format_markdown(rep)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
