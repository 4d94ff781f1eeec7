"""Fashion-MNIST mosaics: a real dense task built from the embedded data set.

A mosaic is a canvas of k x k real Fashion-MNIST items (28 px each) drawn at random from one
split, with a per-pixel label: class 0 is the background, class ``1 + c`` the Fashion-MNIST
class ``c`` of the item the pixel belongs to. Item masks come from the item's own pixels,
thresholded: bright pixels are the item, dark ones the background, and the faint rim in
between (anti-aliased edges, about 5 % of the pixels) is ``IGNORE_INDEX``, because nobody
can say which side it is on. Everything is a function of (split, k, count, seed): the same
arguments give the same canvases and masks, byte for byte.

Train mosaics take their items from Fashion-MNIST's training split, test mosaics from its
test split, so a probe is never evaluated on an item it was trained on.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from .shard_writer import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIRS, IGNORE_INDEX, EncodeOptions, Item, MaskOptions,
                           _index_is_complete, find_fashion_mnist, index_path, read_idx, write_shards)

log = logging.getLogger(__name__)

__all__ = ["MOSAIC_CLASSES", "item_mask", "make_mosaics", "fashion_mnist_mosaic_shards"]

MOSAIC_CLASSES = ["background"] + FASHION_MNIST_CLASSES
ITEM_THRESHOLD = 32  # pixel >= this: the item (about 45 % of Fashion-MNIST pixels)
BACKGROUND_THRESHOLD = 8  # pixel < this: background (half the pixels are exactly 0)
_SPLITS = {"train": (0, "train"), "test": (1, "t10k")}  # split -> (seed stream, IDX file stem)
DEFAULT_COUNT = {"train": 5000, "test": 1000}


def item_mask(pixels: np.ndarray, labels: int | np.ndarray) -> np.ndarray:
    """Class ids (uint8, the shape of ``pixels``): ``1 + label`` on the item, 0 on the
    background, ``IGNORE_INDEX`` on the faint rim between the two thresholds. ``labels``: the
    item's class, or one per pixel."""
    fg = (1 + np.asarray(labels, dtype=np.int64)) * np.ones(pixels.shape, dtype=np.int64)
    mask = np.where(pixels >= ITEM_THRESHOLD, fg, IGNORE_INDEX)
    return np.where(pixels < BACKGROUND_THRESHOLD, 0, mask).astype(np.uint8)


def make_mosaics(images: np.ndarray, labels: np.ndarray, count: int, k: int, seed: int | list[int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` mosaics of k x k items drawn uniformly (with replacement) from ``images``
    (N, s, s) uint8 / ``labels`` (N,): canvases and masks, both (count, k*s, k*s) uint8."""
    if k < 1 or count < 1:
        raise ValueError(f"k and count must be positive, got k={k}, count={count}")
    n, s, _ = images.shape
    picks = np.random.default_rng(seed).integers(0, n, size=(count, k, k))
    # (count, k, k, s, s) -> (count, k*s, k*s): row of cells, then rows of pixels in a cell.
    canvases = np.ascontiguousarray(images[picks].transpose(0, 1, 3, 2, 4).reshape(count, k * s, k * s))
    pixel_labels = labels[picks].repeat(s, axis=1).repeat(s, axis=2)  # each cell's class over its pixels
    return canvases, item_mask(canvases, pixel_labels)


def fashion_mnist_mosaic_shards(out_dir: str, split: str = "train", *, k: int = 3, count: int | None = None,
                                seed: int = 0, data_dir: str | None = None, max_count: int = 10_000,
                                num_workers: int | None = None) -> str:
    """Segmentation shards of Fashion-MNIST mosaics (``fashion-mnist-mosaic{k}-{split}``);
    returns the index path. ``count`` defaults to 5000 (train) / 1000 (test) mosaics.

    Idempotent: when a complete index built with the same arguments exists, nothing is rewritten."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    folder = find_fashion_mnist(data_dir)
    if folder is None:
        raise FileNotFoundError(f"Fashion-MNIST IDX files not found in {data_dir or FASHION_MNIST_DIRS}; "
                                "install them with `apt-get install dataset-fashion-mnist`")
    count = DEFAULT_COUNT[split] if count is None else count
    stream, stem = _SPLITS[split]
    prefix = f"fashion-mnist-mosaic{k}-{split}"
    source = (f"fashion-mnist-mosaic:{split} k={k} count={count} seed={seed} "
              f"thresholds={BACKGROUND_THRESHOLD},{ITEM_THRESHOLD} max_count={max_count}")
    path = index_path(out_dir, prefix)
    if _index_is_complete(path, source):
        log.info("reusing %s", path)
        return path
    images = read_idx(os.path.join(folder, f"{stem}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(folder, f"{stem}-labels-idx1-ubyte.gz"))
    canvases, masks = make_mosaics(images, labels, count, k, [seed, stream])
    items = [Item(f"mosaic{k}-{split}#{i}", -1, canvases[i], masks[i]) for i in range(count)]
    write_shards(items, out_dir, prefix, MOSAIC_CLASSES, max_count=max_count, options=EncodeOptions(encode="png"),
                 num_workers=num_workers, source=source, masks=MaskOptions(num_classes=len(MOSAIC_CLASSES),
                                                                            ignore_value=IGNORE_INDEX))
    return path
