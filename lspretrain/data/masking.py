"""iBOT block masking, as dinov2's MaskingGenerator (blocks of random area and aspect ratio)."""
from __future__ import annotations

import math
import random

import numpy as np


class MaskingGenerator:
    """Boolean (H, W) patch masks made of rectangles until ``num_masking_patches`` are covered.

    Each block has area in [min_num_patches, remaining budget (capped at max_num_patches)] and
    log-uniform aspect ratio in [min_aspect, 1/min_aspect]; a block is kept when it adds new
    patches without exceeding the budget, so a mask never exceeds its target (it can fall
    short when no block fits after 10 tries, as in dinov2).
    """

    def __init__(self, input_size: tuple[int, int], max_num_patches: float | None = None, min_num_patches: int = 4,
                 min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches if max_num_patches is None else max_num_patches
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))

    def _add_block(self, mask: np.ndarray, budget: int) -> int:
        for _ in range(10):
            area = random.uniform(self.min_num_patches, budget)
            aspect = math.exp(random.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top, left = random.randint(0, self.height - h), random.randint(0, self.width - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block[...] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int = 0) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            delta = self._add_block(mask, min(num_masking_patches - count, self.max_num_patches))
            if delta == 0:
                break
            count += delta
        return mask
