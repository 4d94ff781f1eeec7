"""Per-sample geometric transforms (DataLoader workers): PIL image -> uint8 (3, H, W) tensor.

Crops are cut and resized in one PIL call (``resize(box=...)``), the cheapest way to get a
resampled crop on CPU; photometric work is left to the batched ops in ``photometric``.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

_INTERP = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float],
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling: (left, top, right, bottom)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = random.randint(0, width - w), random.randint(0, height - h)
            return left, top, left + w, top + h
    # Fallback: the largest centred crop with an allowed aspect ratio.
    in_ratio = width / height
    w, h = width, height
    if in_ratio < ratio[0]:
        h = int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w = int(round(height * ratio[1]))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float], interpolation: str = "bicubic",
                        flip_p: float = 0.5) -> Image.Image:
    box = random_resized_crop_box(*img.size, scale)
    # reducing_gap: large downscales first box-reduce by an integer factor (much faster, the
    # result is visually the same as a full-size antialiased resize).
    out = img.resize((size, size), _INTERP[interpolation], box=box, reducing_gap=3.0)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < flip_p else out


def resize_shorter(img: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    w, h = img.size
    s = size / min(w, h)
    return img.resize((max(size, round(w * s)), max(size, round(h * s))), _INTERP[interpolation], reducing_gap=3.0)
