"""Write WebDataset shards (``PREFIX-%06d.tar``) plus a JSON index from labelled images.

Each sample is three tar members sharing a zero-padded numeric key (keys must not contain
dots: webdataset splits key and extension at the first dot):
``KEY.jpg|png`` the encoded image, ``KEY.cls`` the integer class as text, ``KEY.json``
``{"path", "size": [w, h], "label"}``. Encoding runs in a process pool; unreadable inputs are
skipped and listed, never fatal.
"""
from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import logging
import os
import re
import struct
import tarfile
import time
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from .decode import IMAGE_EXTS, DecodeError, decode_image
from .shards import ShardIndex, index_path

log = logging.getLogger(__name__)

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/share/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


@dataclass(frozen=True)
class Item:
    """One input: a file path, or in-memory pixels (``path`` then only names it)."""

    path: str
    label: int
    pixels: np.ndarray | None = None


@dataclass(frozen=True)
class EncodeOptions:
    encode: str = "keep"  # "keep" (original bytes, if decodable), "jpeg" or "png"
    quality: int = 95
    resize: int | None = None  # shorter side, with re-encoding


# ---------------------------------------------------------------------------- sources
def imagefolder_items(root: str) -> tuple[list[Item], list[str]]:
    """``root/<class>/**/<image>``; classes are the sorted folder names."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"{root} has no class folders")
    items = []
    for label, name in enumerate(classes):
        for path in sorted(glob.glob(os.path.join(root, name, "**", "*"), recursive=True)):
            if os.path.isfile(path) and path.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                items.append(Item(path, label))
    return items, classes


def csv_items(path: str, root: str | None = None) -> tuple[list[Item], list[str]]:
    """Rows ``path,label`` (tab-separated for .tsv; an optional header row is skipped).

    Integer labels are kept (classes then empty); names are mapped to sorted class indices.
    Relative paths are taken from ``root``, by default the list's folder.
    """
    root = root if root is not None else os.path.dirname(os.path.abspath(path))
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t" if path.endswith(".tsv") else ",") if r]
    if rows and rows[0][0].strip().lower() in ("path", "file", "filename", "image"):
        rows = rows[1:]
    for i, r in enumerate(rows):
        if len(r) < 2:
            raise ValueError(f"{path} row {i + 1}: expected 'path,label', got {r!r}")
    labels = [r[1].strip() for r in rows]
    numeric = all(re.fullmatch(r"-?\d+", x) for x in labels)
    classes = [] if numeric else sorted(set(labels))
    to_int = (lambda x: int(x)) if numeric else {c: i for i, c in enumerate(classes)}.__getitem__
    return [Item(os.path.join(root, r[0].strip()), to_int(lab)) for r, lab in zip(rows, labels)], classes


def read_idx(path: str) -> np.ndarray:
    """An IDX file (MNIST format), optionally gzipped, as a uint8 array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def idx_items(images: str, labels: str) -> list[Item]:
    x, y = read_idx(images), read_idx(labels)
    if len(x) != len(y):
        raise ValueError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    name = os.path.basename(images)
    return [Item(f"{name}#{i}", int(y[i]), x[i]) for i in range(len(x))]


def find_fashion_mnist(data_dir: str | None = None) -> str | None:
    for d in ([data_dir] if data_dir else FASHION_MNIST_DIRS):
        if d and os.path.exists(os.path.join(d, "train-images-idx3-ubyte.gz")):
            return d
    return None


# ---------------------------------------------------------------------------- encoding
def _encode(args: tuple[Item, EncodeOptions]) -> tuple[Item, bytes, str, tuple[int, int]] | tuple[Item, str]:
    """(item, payload, ext, (w, h)) or (item, reason): runs in the pool."""
    item, opt = args
    try:
        if item.pixels is not None:
            image, raw, ext = Image.fromarray(item.pixels), None, None
        else:
            with open(item.path, "rb") as f:
                raw = f.read()
            image = decode_image(raw)  # also the corruption check for "keep"
            ext = item.path.rsplit(".", 1)[-1].lower().replace("jpeg", "jpg")
        if opt.resize:
            w, h = image.size
            s = opt.resize / min(w, h)
            image = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
        if opt.encode == "keep" and raw is not None and not opt.resize:
            return item, raw, ext, image.size
        # "keep" that must re-encode (pixels, or resized) stays lossless for PNG/pixel sources.
        fmt = opt.encode if opt.encode != "keep" else ("png" if raw is None or ext == "png" else "jpeg")
        buf = io.BytesIO()
        image.save(buf, format=fmt.upper(), quality=opt.quality) if fmt == "jpeg" else image.save(buf, format="PNG")
        return item, buf.getvalue(), "jpg" if fmt == "jpeg" else "png", image.size
    except (OSError, DecodeError, ValueError) as e:
        return item, f"{type(e).__name__}: {e}"


def _tar_size(n: int) -> int:
    return 512 + -(-n // 512) * 512  # header + payload padded to 512-byte blocks


class _ShardSink:
    """Writes numbered shards, rolling over on sample count or byte size."""

    def __init__(self, out_dir: str, prefix: str, max_count: int, max_bytes: int):
        self.out_dir, self.prefix, self.max_count, self.max_bytes = out_dir, prefix, max_count, max_bytes
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._count = self._bytes = 0
        self.total = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._path = os.path.join(self.out_dir, name)
        self._tar = tarfile.open(self._path + ".tmp", "w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"name": name, "num_samples": 0, "num_bytes": 0})
        self._count = self._bytes = 0

    def _close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._path + ".tmp", self._path)
            self.shards[-1].update(num_samples=self._count, num_bytes=os.path.getsize(self._path))
            self._tar = None

    def add(self, members: dict[str, bytes]) -> None:
        size = sum(_tar_size(len(v)) for v in members.values())
        if self._tar is None or self._count >= self.max_count or (self._count and self._bytes + size > self.max_bytes):
            self._close()
            self._open()
        key = f"{self.total:09d}"
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444  # mtime 0: byte-identical reruns
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size
        self.total += 1

    def finish(self) -> list[dict]:
        self._close()
        return self.shards


class _Progress:
    def __init__(self, total: int, every_s: float = 2.0):
        self.total, self.every_s = total, every_s
        self.start = self.last = time.monotonic()

    def update(self, done: int, shards: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        log.info("%d/%d samples (%.1f%%) %.0f samples/s ETA %.0fs, %d shards", done, self.total,
                 100.0 * done / max(self.total, 1), rate, eta, shards)


def write_shards(items: Sequence[Item], out_dir: str, prefix: str, classes: Sequence[str] = (), *,
                 max_count: int = 10_000, max_bytes: int = 1 << 30, shuffle_seed: int | None = None,
                 options: EncodeOptions = EncodeOptions(), num_workers: int | None = None,
                 source: str = "") -> ShardIndex:
    """Encode ``items`` into ``out_dir/prefix-%06d.tar`` and write ``prefix-index.json``.

    ``shuffle_seed`` permutes the items first (reproducibly). Unreadable items are skipped,
    logged, and listed in the index's ``skipped``. Returns the index.
    """
    if max_count < 1 or max_bytes < 1:
        raise ValueError(f"max_count and max_bytes must be positive, got {max_count}, {max_bytes}")
    os.makedirs(out_dir, exist_ok=True)
    order = list(range(len(items)))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(items)).tolist()
    sink = _ShardSink(out_dir, prefix, max_count, max_bytes)
    skipped: list[dict] = []
    progress = _Progress(len(items))
    num_workers = os.cpu_count() or 1 if num_workers is None else num_workers
    jobs: Iterable = ((items[i], options) for i in order)
    pool = get_context("fork").Pool(num_workers) if num_workers > 1 else None
    try:
        results = pool.imap(_encode, jobs, chunksize=32) if pool else map(_encode, jobs)
        for done, result in enumerate(results, 1):
            if len(result) == 2:
                item, reason = result
                log.warning("skipped %s: %s", item.path, reason)
                skipped.append({"path": item.path, "reason": reason})
            else:
                item, payload, ext, (w, h) = result
                meta = {"path": item.path, "size": [w, h], "label": item.label}
                sink.add({ext: payload, "cls": str(item.label).encode(), "json": json.dumps(meta).encode()})
            progress.update(done, len(sink.shards))
    finally:
        if pool:
            pool.close()
            pool.join()
    shards = sink.finish()
    progress.update(len(items), len(shards), force=True)
    keep = {s["name"] for s in shards}
    for stale in glob.glob(os.path.join(out_dir, f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")):
        if os.path.basename(stale) not in keep:  # left over from an earlier, larger run
            os.remove(stale)
    index = ShardIndex(shards, list(classes), skipped, source)
    index.save(index_path(out_dir, prefix))
    if skipped:
        log.warning("%d of %d inputs skipped:\n  %s", len(skipped), len(items),
                    "\n  ".join(f"{s['path']}: {s['reason']}" for s in skipped))
    log.info("wrote %d samples in %d shards to %s", index.num_samples, len(shards), index_path(out_dir, prefix))
    return index


def _index_is_complete(path: str, source: str) -> bool:
    if not os.path.exists(path):
        return False
    idx = ShardIndex.load(path)
    folder = os.path.dirname(path)
    return idx.source == source and all(
        os.path.exists(os.path.join(folder, s["name"])) and os.path.getsize(os.path.join(folder, s["name"])) ==
        s["num_bytes"] for s in idx.shards)


def fashion_mnist_shards(out_dir: str, split: str = "train", *, data_dir: str | None = None,
                         options: EncodeOptions = EncodeOptions(encode="png"), max_count: int = 10_000,
                         shuffle_seed: int | None = 0, num_workers: int | None = None) -> str:
    """Shards of Fashion-MNIST from the Debian package ``dataset-fashion-mnist``; returns the index path.

    Idempotent: when a complete index built with the same settings exists, nothing is rewritten.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = find_fashion_mnist(data_dir)
    if folder is None:
        raise FileNotFoundError(f"Fashion-MNIST IDX files not found in {data_dir or FASHION_MNIST_DIRS}; "
                                "install them with `apt-get install dataset-fashion-mnist`")
    stem = "train" if split == "train" else "t10k"
    prefix = f"fashion-mnist-{split}"
    source = (f"fashion-mnist:{split} encode={options.encode} quality={options.quality} resize={options.resize} "
              f"max_count={max_count} shuffle_seed={shuffle_seed}")
    path = index_path(out_dir, prefix)
    if _index_is_complete(path, source):
        log.info("reusing %s", path)
        return path
    items = idx_items(os.path.join(folder, f"{stem}-images-idx3-ubyte.gz"),
                      os.path.join(folder, f"{stem}-labels-idx1-ubyte.gz"))
    write_shards(items, out_dir, prefix, FASHION_MNIST_CLASSES, max_count=max_count, shuffle_seed=shuffle_seed,
                 options=options, num_workers=num_workers, source=source)
    return path
