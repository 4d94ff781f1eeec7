"""Collate functions: list of ``{"image", "label", "key"}`` samples -> dict of tensors.

They run in the DataLoader workers, after the per-sample (geometric) transforms.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def _to_tensor(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image
    if isinstance(image, Image.Image):  # no transform given: uint8 CHW
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1).contiguous()
    return torch.as_tensor(image)


def default_collate(samples: list[dict]) -> dict:
    """Supervised batch: ``{"images": (B, ...), "labels": (B,) int64}``; images must share a shape."""
    return {"images": torch.stack([_to_tensor(s["image"]) for s in samples]),
            "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64)}
