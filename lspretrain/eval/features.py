"""Frozen CLS features of a labelled data set."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..progress import Progress


@torch.no_grad()
def extract_features(backbone: nn.Module, batches: Iterable[dict], device: torch.device | str = "cpu",
                     max_batches: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised CLS features (N, C) and labels (N,) of ``{"images", "labels"}`` batches,
    with a progress line every 10 s."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    total = sum(len(b["labels"]) for b in batches) if isinstance(batches, list) else None
    progress = Progress("features", total, unit="images")
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        cls = backbone.forward_features(batch["images"].to(device))["cls_norm"]
        feats.append(F.normalize(cls.float(), dim=-1).cpu())
        labels.append(batch["labels"].cpu())
        progress.update(len(batch["labels"]))
    backbone.train(was_training)
    if not feats:
        raise ValueError("extract_features: the data gave no batch")
    return torch.cat(feats), torch.cat(labels)
