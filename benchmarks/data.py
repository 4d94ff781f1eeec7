#!/usr/bin/env python
"""DINOv2 multi-crop throughput: lspretrain.data vs a straightforward per-sample PIL pipeline.

Both read the same WebDataset shards (256 px JPEGs written by the shard writer from
Fashion-MNIST, or synthetic images when the Debian package is absent) in the same run.
Baseline: PIL decode, then per crop: crop, resize (bicubic), flip, colour jitter (ImageEnhance
+ HSV hue), grayscale, PIL Gaussian blur, solarize, to float tensor, normalise, one crop at a
time. Ours: simplejpeg decode, one-pass crop+resize, batched fused colour matrix + kornia blur
in the collate. Prints samples/s (median of --repeats) and ratios.

  python benchmarks/data.py --samples 1024 --repeats 3
"""
from __future__ import annotations

import argparse
import io
import math
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lspretrain.data import DataConfig, DINOv2Collate, DINOv2MultiCrop, build_loader  # noqa: E402
from lspretrain.data.photometric import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from lspretrain.data.shard_writer import EncodeOptions, Item, find_fashion_mnist, idx_items, write_shards  # noqa: E402
from lspretrain.data.shards import expand_spec  # noqa: E402
from lspretrain.data.tario import iter_tar_samples  # noqa: E402

GLOBAL, LOCAL, N_LOCAL, BATCH = 224, 96, 8, 32


def make_data(out: str, n: int) -> tuple[str, str]:
    folder = find_fashion_mnist()
    if folder:
        items = idx_items(os.path.join(folder, "t10k-images-idx3-ubyte.gz"),
                          os.path.join(folder, "t10k-labels-idx1-ubyte.gz"))[:n]
        what = "Fashion-MNIST test images upscaled to 256 px"
    else:
        rng = np.random.default_rng(0)
        items = [Item(f"synthetic{i}", i % 10, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for i in range(n)]
        what = "synthetic images upscaled to 256 px"
    idx = write_shards(items, out, "bench", max_count=256, options=EncodeOptions("jpeg", 90, resize=256))
    return os.path.join(out, f"bench-{{000000..{len(idx.shards) - 1:06d}}}.tar"), what


# ---------------------------------------------------------------- the straightforward baseline
def _rrc(img, size, scale):
    w, h = img.size
    for _ in range(10):
        area = w * h * random.uniform(*scale)
        ar = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = random.randint(0, w - cw), random.randint(0, h - ch)
            return img.crop((x, y, x + cw, y + ch)).resize((size, size), Image.BICUBIC)
    return img.resize((size, size), Image.BICUBIC)


def _jitter(img):
    ops = [lambda i: ImageEnhance.Brightness(i).enhance(random.uniform(0.6, 1.4)),
           lambda i: ImageEnhance.Contrast(i).enhance(random.uniform(0.6, 1.4)),
           lambda i: ImageEnhance.Color(i).enhance(random.uniform(0.8, 1.2)),
           _hue]
    random.shuffle(ops)
    for op in ops:
        img = op(img)
    return img


def _hue(img):
    h, s, v = img.convert("HSV").split()
    shift = int(random.uniform(-0.1, 0.1) * 255)
    h = Image.fromarray((np.asarray(h).astype(np.int16) + shift).astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def _view(img, size, scale, blur_p, sol_p):
    img = _rrc(img, size, scale)
    if random.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if random.random() < 0.8:
        img = _jitter(img)
    if random.random() < 0.2:
        img = img.convert("L").convert("RGB")
    if random.random() < blur_p:
        img = img.filter(ImageFilter.GaussianBlur(random.uniform(0.1, 2.0)))
    if random.random() < sol_p:
        img = ImageOps.solarize(img, 128)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def baseline_sample(data: bytes):
    img = Image.open(io.BytesIO(data)).convert("RGB")
    g = [_view(img, GLOBAL, (0.32, 1.0), 1.0, 0.0), _view(img, GLOBAL, (0.32, 1.0), 0.1, 0.2)]
    loc = [_view(img, LOCAL, (0.05, 0.32), 0.5, 0.0) for _ in range(N_LOCAL)]
    return g, loc


class Baseline(IterableDataset):
    def __init__(self, spec: str, n: int):
        self.urls, self.n = expand_spec(spec), n

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        done = 0
        for url in self.urls[wid::nw]:
            for s in iter_tar_samples(url):
                g, loc = baseline_sample(s["jpg"])
                yield torch.stack(g), torch.stack(loc)
                done += 1
                if done >= self.n // nw:
                    return


def run_baseline(spec: str, n: int, workers: int) -> float:
    dl = DataLoader(Baseline(spec, n), batch_size=BATCH, num_workers=workers,
                    worker_init_fn=lambda _: torch.set_num_threads(1))
    t = time.perf_counter()
    count = sum(g.shape[0] for g, _ in dl)
    return count / (time.perf_counter() - t)


def run_ours(spec: str, n: int, workers: int, photometric: bool) -> float:
    mc = DINOv2MultiCrop(GLOBAL, LOCAL, N_LOCAL)
    col = DINOv2Collate(patch_size=14, global_size=GLOBAL, photometric=mc.photometric if photometric else None)
    cfg = DataConfig(shards=spec, mode="epoch", batch_size=BATCH, num_workers=workers, shuffle_window=64)
    loader = build_loader(cfg, mc, col, rank=0, world_size=1)
    t = time.perf_counter()
    count = 0
    for b in loader:
        count += b["labels"].shape[0]
        if count >= n:
            break
    rate = count / (time.perf_counter() - t)
    loader.close()
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", default=None, help="folder for the benchmark shards (default: a temp dir)")
    args = p.parse_args()
    torch.set_num_threads(1)  # "per core": the single-process runs use one thread
    out = args.data or tempfile.mkdtemp(prefix="lsp-bench-")
    spec, what = make_data(out, args.samples)
    print(f"data: {args.samples} {what}, shards {spec}")
    print(f"views: 2 x {GLOBAL} + {N_LOCAL} x {LOCAL}, batch {BATCH}, torch threads 1, {os.cpu_count()} cores\n")
    rows = {
        "baseline PIL, 1 process": lambda: run_baseline(spec, args.samples // 2, 0),
        "ours, 1 process (photometric in collate)": lambda: run_ours(spec, args.samples // 2, 0, True),
        "ours, 1 process (photometric on device)": lambda: run_ours(spec, args.samples // 2, 0, False),
        f"baseline PIL, DataLoader {args.workers} workers": lambda: run_baseline(spec, args.samples, args.workers),
        f"ours, loader {args.workers} workers (photometric in collate)":
            lambda: run_ours(spec, args.samples, args.workers, True),
    }
    results = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, fn in rows.items():
            results[name].append(fn())
    med = {k: statistics.median(v) for k, v in results.items()}
    base1, baseN = med["baseline PIL, 1 process"], med[f"baseline PIL, DataLoader {args.workers} workers"]
    print(f"{'pipeline':58s} {'samples/s (median)':>18s} {'runs':>24s} {'vs baseline':>12s}")
    for name, v in med.items():
        ref = base1 if "1 process" in name else baseN
        runs = " ".join(f"{r:.1f}" for r in results[name])
        print(f"{name:58s} {v:18.1f} {runs:>24s} {v / ref:11.2f}x")


if __name__ == "__main__":
    main()
