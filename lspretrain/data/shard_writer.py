"""Write WebDataset shards (``PREFIX-%06d.tar``) plus a JSON index from labelled images.

Each sample is three tar members sharing a zero-padded numeric key (keys must not contain
dots: webdataset splits key and extension at the first dot):
``KEY.jpg|png`` the encoded image, ``KEY.cls`` the integer class as text, ``KEY.json``
``{"path", "size": [w, h], "label"}``. Encoding runs in a process pool; unreadable inputs are
skipped and listed, never fatal.

Segmentation samples (an ``Item`` with a ``mask``) hold ``KEY.jpg|png`` and ``KEY.seg.png``
instead of ``KEY.cls``: the mask as an 8-bit single-channel PNG of class ids ``0 ..
num_classes - 1``, ``IGNORE_INDEX`` (255) where no class applies, always the image's size.
Whatever convention the source masks use (ADE20K: 0 = "other", classes from 1) is mapped to
this one when the shards are written, so every reader sees one label space.
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
IGNORE_INDEX = 255  # the mask value of unlabelled pixels in segmentation shards
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


@dataclass(frozen=True)
class Item:
    """One input: a file path, or in-memory pixels (``path`` then only names it); for
    segmentation also its mask, a PNG path or an (h, w) uint8 array of source label values."""

    path: str
    label: int
    pixels: np.ndarray | None = None
    mask: str | np.ndarray | None = None


@dataclass(frozen=True)
class MaskOptions:
    """How source mask values become shard class ids (see the module docstring).

    ``reduce_zero_label``: the source's 0 means unlabelled and classes start at 1 (ADE20K);
    ``ignore_value``: a source value that means unlabelled (e.g. Cityscapes' 255); any other
    value that is not a class below ``num_classes`` makes the pair bad (skipped and listed)."""

    num_classes: int
    reduce_zero_label: bool = False
    ignore_value: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes < IGNORE_INDEX:
            raise ValueError(f"num_classes must be in [1, {IGNORE_INDEX - 1}] (8-bit masks, {IGNORE_INDEX} = ignore), "
                             f"got {self.num_classes}")

    def class_names(self) -> list[str]:
        """Default names: the source value of each class, as the dataset's own docs number them."""
        return [str(c + 1 if self.reduce_zero_label else c) for c in range(self.num_classes)]

    def to_classes(self, values: np.ndarray) -> np.ndarray:
        """Source values (h, w) -> class ids with ``IGNORE_INDEX``; ValueError naming a bad value."""
        v = values.astype(np.int64)
        ignore = v == self.ignore_value if self.ignore_value is not None else np.zeros(v.shape, dtype=bool)
        if self.reduce_zero_label:
            ignore |= v == 0
            v = v - 1
        bad = ~ignore & ((v < 0) | (v >= self.num_classes))
        if bad.any():
            raw = int(values[bad].max())
            raise ValueError(f"mask holds label {raw}, above the {self.num_classes} classes "
                             f"(--num-classes {self.num_classes}{', 0 = ignore' if self.reduce_zero_label else ''})")
        return np.where(ignore, IGNORE_INDEX, v).astype(np.uint8)


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


def segmentation_items(image_dir: str, mask_dir: str, mask_ext: str = "png") -> tuple[list[Item], list[dict]]:
    """Images under ``image_dir`` paired with the mask of the same relative path and stem under
    ``mask_dir`` (``a/b.jpg`` <-> ``a/b.png``). Returns (items, masks without an image, as
    skipped entries). An image without a mask stays an item: the writer skips and lists it."""
    for d in (image_dir, mask_dir):
        if not os.path.isdir(d):
            raise ValueError(f"{d} is not a directory")
    items, stems = [], set()
    for path in sorted(glob.glob(os.path.join(image_dir, "**", "*"), recursive=True)):
        if os.path.isfile(path) and path.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
            stem = os.path.splitext(os.path.relpath(path, image_dir))[0]
            stems.add(stem)
            items.append(Item(path, -1, mask=os.path.join(mask_dir, f"{stem}.{mask_ext}")))
    orphans = [{"path": m, "reason": f"no image for this mask under {image_dir}"}
               for m in sorted(glob.glob(os.path.join(mask_dir, "**", f"*.{mask_ext}"), recursive=True))
               if os.path.splitext(os.path.relpath(m, mask_dir))[0] not in stems]
    if not items:
        raise ValueError(f"{image_dir} holds no images ({', '.join(IMAGE_EXTS)})")
    return items, orphans


ADE20K_SPLITS = ("training", "validation")


def ade20k_items(root: str, split: str) -> tuple[list[Item], list[dict]]:
    """ADE20K's release layout (``ADEChallengeData2016``): ``images/SPLIT/*.jpg`` with
    ``annotations/SPLIT/*.png`` (0 = other/ignore, classes 1..150: ``ADE20K_MASKS``)."""
    if split not in ADE20K_SPLITS:
        raise ValueError(f"ADE20K split must be one of {ADE20K_SPLITS}, got {split!r}")
    return segmentation_items(os.path.join(root, "images", split), os.path.join(root, "annotations", split))


ADE20K_MASKS = MaskOptions(num_classes=150, reduce_zero_label=True)


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
def _encode(args: tuple[Item, EncodeOptions, MaskOptions | None]
            ) -> tuple[Item, dict[str, bytes], tuple[int, int]] | tuple[Item, str]:
    """(item, tar members by extension, (w, h)) or (item, reason): runs in the pool."""
    item, opt, masks = args
    try:
        if item.pixels is not None:
            image, raw, ext = Image.fromarray(item.pixels), None, None
        else:
            with open(item.path, "rb") as f:
                raw = f.read()
            image = decode_image(raw)  # also the corruption check for "keep"
            ext = item.path.rsplit(".", 1)[-1].lower().replace("jpeg", "jpg")
        source_size = image.size
        if opt.resize:
            w, h = image.size
            s = opt.resize / min(w, h)
            image = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
        if opt.encode == "keep" and raw is not None and not opt.resize:
            members = {ext: raw}
        else:
            # "keep" that must re-encode (pixels, or resized) stays lossless for PNG/pixel sources.
            fmt = opt.encode if opt.encode != "keep" else ("png" if raw is None or ext == "png" else "jpeg")
            buf = io.BytesIO()
            image.save(buf, format=fmt.upper(), quality=opt.quality) if fmt == "jpeg" else image.save(buf, format="PNG")
            members = {"jpg" if fmt == "jpeg" else "png": buf.getvalue()}
        if item.mask is not None:
            members["seg.png"] = _encode_mask(item.mask, masks, source_size, image.size)
        return item, members, image.size
    except (OSError, DecodeError, ValueError) as e:
        return item, f"{type(e).__name__}: {e}"


_MASK_MODES = ("1", "L", "P", "I", "I;16")  # one class id per pixel (P: palette indices)


def _encode_mask(mask: str | np.ndarray, opt: MaskOptions, source_size: tuple[int, int], size: tuple[int, int]) -> bytes:
    """The shard's mask PNG: class ids of ``mask`` (checked against the image's ``source_size``),
    resized (nearest) to the written image's ``size``."""
    if isinstance(mask, np.ndarray):
        values = mask
    else:
        if not os.path.isfile(mask):
            raise ValueError(f"missing mask {mask}")
        with Image.open(mask) as m:
            if m.mode not in _MASK_MODES:
                raise ValueError(f"mask {mask} has mode {m.mode}: expected one class id per pixel ({', '.join(_MASK_MODES)})")
            values = np.asarray(m)
    if values.ndim != 2:
        raise ValueError(f"mask of shape {values.shape}: expected (h, w) class ids")
    h, w = values.shape
    if (w, h) != tuple(source_size):
        raise ValueError(f"mask is {w}x{h} but the image is {source_size[0]}x{source_size[1]}")
    image = Image.fromarray(opt.to_classes(values), "L")
    if image.size != tuple(size):
        image = image.resize(size, Image.NEAREST)  # class ids must never be interpolated
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


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
                 source: str = "", masks: MaskOptions | None = None, skipped: Sequence[dict] = ()) -> ShardIndex:
    """Encode ``items`` into ``out_dir/prefix-%06d.tar`` and write ``prefix-index.json``.

    ``shuffle_seed`` permutes the items first (reproducibly). Unreadable items are skipped,
    logged, and listed in the index's ``skipped``, after the inputs already rejected by the
    caller (``skipped``: e.g. masks without an image). Items with a mask need ``masks``: a pair
    whose mask is missing, unreadable, of another size or holds a label outside the classes is
    skipped the same way. Returns the index.
    """
    if max_count < 1 or max_bytes < 1:
        raise ValueError(f"max_count and max_bytes must be positive, got {max_count}, {max_bytes}")
    if masks is None and any(item.mask is not None for item in items):
        raise ValueError("items with masks need MaskOptions (masks=...): how many classes, which value is ignored")
    if masks is not None:  # the index's class list is the probe's label space: one name per class
        classes = list(classes) or masks.class_names()
        if len(classes) != masks.num_classes:
            raise ValueError(f"{len(classes)} class names for {masks.num_classes} classes (num_classes)")
    os.makedirs(out_dir, exist_ok=True)
    order = list(range(len(items)))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(items)).tolist()
    sink = _ShardSink(out_dir, prefix, max_count, max_bytes)
    skipped, rejected = list(skipped), len(skipped)
    progress = _Progress(len(items))
    num_workers = os.cpu_count() or 1 if num_workers is None else num_workers
    jobs: Iterable = ((items[i], options, masks) for i in order)
    pool = get_context("fork").Pool(num_workers) if num_workers > 1 else None
    try:
        results = pool.imap(_encode, jobs, chunksize=32) if pool else map(_encode, jobs)
        for done, result in enumerate(results, 1):
            if len(result) == 2:
                item, reason = result
                log.warning("skipped %s: %s", item.path, reason)
                skipped.append({"path": item.path, "reason": reason})
            else:
                item, members, (w, h) = result
                if item.mask is None:
                    meta = {"path": item.path, "size": [w, h], "label": item.label}
                    members["cls"] = str(item.label).encode()
                else:
                    meta = {"path": item.path, "size": [w, h], "mask": item.mask if isinstance(item.mask, str) else None}
                sink.add({**members, "json": json.dumps(meta).encode()})
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
        log.warning("%d of %d inputs skipped:\n  %s", len(skipped), len(items) + rejected,
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
