"""Supervised image classification: a backbone plus a linear head on the normalized CLS token.

Losses: cross-entropy with optional label smoothing, or binary cross-entropy (DeiT-III) on
one-hot / soft targets, optionally binarized at a threshold (DeiT-III binarizes mixup targets).
A batch holds ``images`` (B, 3, H, W) and ``labels``: class indices (B,) or soft targets (B, K).
The DeiT-III method extends this one (augmentations, mixup).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine.config import ModelConfig, TrainConfig
from ..models import build_backbone
from .base import Method

__all__ = ["ClassificationConfig", "Classification"]


@dataclass
class ClassificationConfig:
    name: str = "classification"
    num_classes: int = 1000
    loss: Literal["ce", "bce"] = "ce"
    label_smoothing: float = 0.0  # ce only
    bce_threshold: float = 0.0  # bce: targets > threshold become 1 (0: keep soft targets)
    head_init_std: float = 0.01


class Classification(Method):
    config_class = ClassificationConfig

    def __init__(self, cfg: ClassificationConfig, model_cfg: ModelConfig):
        super().__init__(cfg, model_cfg)
        self.backbone = build_backbone(model_cfg.arch, model_cfg.spec, **model_cfg.overrides)
        self.head = nn.Linear(self.backbone.embed_dim, cfg.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=cfg.head_init_std)
        nn.init.zeros_(self.head.bias)

    def sharded_modules(self) -> list[nn.Module]:
        return [self.backbone]

    def get_student_output(self, batch: dict, step: int) -> torch.Tensor:
        return self.head(self.backbone(batch["images"]))

    def compute_losses(self, teacher, logits: torch.Tensor, batch: dict, step: int):
        logits = logits.float()
        labels = batch["labels"]
        if labels.ndim == 1:
            loss = self._loss(logits, F.one_hot(labels, logits.shape[-1]).float(), labels)
            hard = labels
        else:
            loss = self._loss(logits, labels.float(), None)
            hard = labels.argmax(-1)
        acc = (logits.argmax(-1) == hard).float().mean()
        return loss, {"loss_cls": loss.detach(), "acc1": acc}

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.loss == "bce":
            if self.cfg.bce_threshold > 0:
                targets = (targets > self.cfg.bce_threshold).float()
            return F.binary_cross_entropy_with_logits(logits, targets)
        if indices is not None:
            return F.cross_entropy(logits, indices, label_smoothing=self.cfg.label_smoothing)
        return F.cross_entropy(logits, targets, label_smoothing=self.cfg.label_smoothing)

    # -- data and accounting ------------------------------------------------------------
    def build_loader(self, cfg: TrainConfig, rank: int, world_size: int):
        if cfg.data_source == "synthetic":
            from ..engine.synthetic import SyntheticLoader

            s = cfg.synthetic
            return SyntheticLoader(s.batch_size, s.img_size, s.num_classes, s.seed, rank, world_size)
        from ..data import build_loader

        return build_loader(cfg.data, self.transform(), self.collate, rank=rank, world_size=world_size)

    def transform(self):
        """Resize + ImageNet normalization (no augmentation; DeiT-III supplies 3-Augment)."""
        return functools.partial(_resize_normalize, size=self.backbone.cfg.img_size)

    @staticmethod
    def collate(samples: list) -> dict:
        images, labels = zip(*samples)
        return {"images": torch.stack(images), "labels": torch.as_tensor(labels)}


    def train_flops_per_sample(self) -> float:
        from ..accounting import flop_counter_flops

        with torch.device("meta"):
            backbone = build_backbone(self.model_cfg.arch, self.model_cfg.spec, **self.model_cfg.overrides)
        c = backbone.cfg
        head = 2 * 3 * c.embed_dim * self.cfg.num_classes  # forward + backward of the head matmul
        return float(flop_counter_flops(backbone.train(), c.img_size, backward=True) + head)

    def tokens_per_sample(self) -> int:
        c = self.backbone.cfg
        return c.grid_size**2 + c.num_prefix_tokens


_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _resize_normalize(image, size: int) -> torch.Tensor:
    """RGB PIL image -> normalized (3, size, size) float tensor."""
    from PIL import Image

    arr = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    return (torch.from_numpy(arr).permute(2, 0, 1) - _MEAN) / _STD
