"""Per-sample transforms for the three recipes (run in DataLoader workers).

Each returns uint8 tensors (geometry only); its batched photometric half is the
``photometric`` attribute, applied by the collate function or on the training device.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .geometric import random_resized_crop, resize_shorter, to_uint8_tensor
from .photometric import DINOv2Photometric, ThreeAugmentPhotometric, normalize, to_float


@dataclass
class DINOv2MultiCrop:
    """2 global crops (scale 0.32-1) + ``n_local`` local crops (0.05-0.32), bicubic, flipped at random.

    Returns ``{"global": (2, 3, G, G) uint8, "local": (n_local, 3, l, l) uint8}``. The view
    photometrics (``photometric``: global 1, global 2, locals) are DINOv2's.
    """

    global_size: int = 224
    local_size: int = 96  # 98 for ViT-L/g with patch 14
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    photometric: tuple = field(default_factory=lambda: (
        DINOv2Photometric(blur_p=1.0), DINOv2Photometric(blur_p=0.1, solarize_p=0.2), DINOv2Photometric(blur_p=0.5)))

    def __call__(self, img: Image.Image) -> dict:
        g = [to_uint8_tensor(random_resized_crop(img, self.global_size, self.global_scale)) for _ in range(2)]
        loc = [to_uint8_tensor(random_resized_crop(img, self.local_size, self.local_scale))
               for _ in range(self.n_local)]
        empty = torch.zeros(0, 3, self.local_size, self.local_size, dtype=torch.uint8)
        return {"global": torch.stack(g), "local": torch.stack(loc) if loc else empty}


@dataclass
class ThreeAugment:
    """DeiT-III: RandomResizedCrop (0.08-1, bicubic) + flip here; ``photometric`` does the rest."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    photometric: ThreeAugmentPhotometric = field(default_factory=ThreeAugmentPhotometric)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return to_uint8_tensor(random_resized_crop(img, self.size, self.scale))


@dataclass
class SimpleRandomCrop:
    """DeiT-III Simple Random Crop: resize shorter side, random crop with 4 px reflect padding, flip."""

    size: int = 224
    padding: int = 4
    photometric: ThreeAugmentPhotometric = field(default_factory=ThreeAugmentPhotometric)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(resize_shorter(img, self.size))
        p = self.padding
        arr = np.pad(arr, ((p, p), (p, p), (0, 0)), mode="reflect")
        top = random.randint(0, arr.shape[0] - self.size)
        left = random.randint(0, arr.shape[1] - self.size)
        arr = arr[top:top + self.size, left:left + self.size]
        if random.random() < 0.5:
            arr = arr[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


@dataclass
class EvalTransform:
    """Resize the shorter side to ``size / crop_pct`` (bicubic), centre crop ``size``, normalise."""

    size: int = 224
    crop_pct: float = 0.875

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = resize_shorter(img, int(self.size / self.crop_pct))
        w, h = img.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        return normalize(to_float(to_uint8_tensor(img)[None]))[0]
