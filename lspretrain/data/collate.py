"""Collate functions: list of ``{"image", "label", "key"}`` samples -> dict of tensors.

They run in the DataLoader workers, after the per-sample (geometric) transforms. Batched
photometric augmentation (and Mixup/CutMix) happens here when the collate is given them;
built with ``photometric=None`` it hands over uint8 images and the method applies the
transform's ``photometric`` on the training device after ``prepare_batch`` (the methods'
``photometric`` key; ``auto`` = on CUDA).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .masking import MaskingGenerator
from .mixup import MixupCutmix


def _to_tensor(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image
    if isinstance(image, Image.Image):  # no transform given: uint8 CHW
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1).contiguous()
    return torch.as_tensor(image)


def _labels(samples: list[dict]) -> torch.Tensor:
    return torch.tensor([s["label"] for s in samples], dtype=torch.int64)


def default_collate(samples: list[dict]) -> dict:
    """Supervised batch: ``{"images": (B, ...), "labels": (B,) int64}``; images must share a shape."""
    return {"images": torch.stack([_to_tensor(s["image"]) for s in samples]), "labels": _labels(samples)}


@dataclass
class SupervisedCollate:
    """DeiT-III batches: photometric (e.g. ``ThreeAugment().photometric``), then Mixup/CutMix.

    Output ``{"images": (B, 3, H, W) float32, "labels": (B,), "targets": (B, K) float}``
    (``targets`` only with mixup). ``photometric=None`` leaves uint8 images for the device.
    """

    photometric: Callable | None = None
    mixup: MixupCutmix | None = None

    def __call__(self, samples: list[dict]) -> dict:
        batch = default_collate(samples)
        if self.photometric is not None:
            batch["images"] = self.photometric(batch["images"])
        if self.mixup is not None:
            if batch["images"].dtype == torch.uint8:
                raise ValueError("SupervisedCollate: mixup needs float images; give it a photometric transform")
            batch["images"], batch["targets"] = self.mixup(batch["images"], batch["labels"])
        return batch


@dataclass
class DINOv2Collate:
    """Batches of DINOv2MultiCrop outputs with iBOT masks for the global crops.

    Crops are ordered crop-major as in dinov2 (all samples' first global crop, then all second).
    ``mask_probability`` of the 2B global crops get a block mask; their target ratios are spread
    evenly over ``mask_ratio`` (one sub-interval each), the others get none; the mask order is
    shuffled. Keys (dinov2 names in brackets):
      global_crops (2B,3,G,G), local_crops (nL*B,3,l,l), labels (B,),
      masks (2B, P) bool [collated_masks], mask_indices (M,) [mask_indices_list]: the
      masked patches' positions in ``masks.flatten()``, so the step selects them without reading
      the device from the host (dinov2's masks_weight is computed by ``ibot_loss`` from ``masks``).
    """

    patch_size: int
    global_size: int
    photometric: tuple | None = None  # DINOv2MultiCrop().photometric; None: uint8 out (device)
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5

    def __post_init__(self) -> None:
        g = self.global_size // self.patch_size
        self.generator = MaskingGenerator((g, g), max_num_patches=0.5 * g * g)

    def __call__(self, samples: list[dict]) -> dict:
        b = len(samples)
        g = torch.cat([torch.stack([s["image"]["global"][i] for s in samples]) for i in range(2)])
        n_local = samples[0]["image"]["local"].shape[0]
        loc = torch.cat([torch.stack([s["image"]["local"][i] for s in samples]) for i in range(n_local)]) \
            if n_local else samples[0]["image"]["local"]
        if self.photometric is not None:
            g1, g2, lp = self.photometric
            g = torch.cat([g1(g[:b]), g2(g[b:])])
            loc = lp(loc) if n_local else loc.float()
        return {"global_crops": g, "local_crops": loc, "labels": _labels(samples), **self.masks(2 * b)}

    def masks(self, n: int) -> dict:
        patches = self.generator.num_patches
        n_masked = int(n * self.mask_probability)
        bounds = np.linspace(*self.mask_ratio, n_masked + 1)
        masks = [self.generator(int(patches * random.uniform(lo, hi))) for lo, hi in zip(bounds[:-1], bounds[1:])]
        masks += [self.generator(0) for _ in range(n - n_masked)]
        random.shuffle(masks)
        m = torch.from_numpy(np.stack(masks)).flatten(1)
        return {"masks": m, "mask_indices": m.flatten().nonzero().flatten()}
