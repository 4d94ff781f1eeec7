"""Mixup / CutMix on a batch, DeiT-III style (timm ``Mixup`` semantics, mode "batch").

One mixing coefficient per batch; the partner of image i is image B-1-i. With probability
``switch_prob`` CutMix (Beta(cutmix_alpha)) is used instead of Mixup (Beta(mixup_alpha)); the
CutMix coefficient is corrected to the pasted box's true area. Targets are one-hot (optionally
label-smoothed) and mixed with the same coefficient.

``binarize=True`` reproduces DeiT-III's BCE targets: ``target = (mixed > bce_threshold)``
with threshold 0.0 (deit engine: ``targets.gt(0.0)``), i.e. both mixed classes become 1.
That only makes sense without label smoothing (every class would be > 0), so the two
options are exclusive.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class MixupCutmix:
    num_classes: int
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.0
    binarize: bool = True
    bce_threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.binarize and self.label_smoothing > 0:
            raise ValueError("MixupCutmix: binarized BCE targets with label_smoothing > 0 would set every class "
                             "to 1; use binarize=False for soft (smoothed) targets")

    def _lam(self) -> tuple[float, bool]:
        if np.random.rand() >= self.prob:
            return 1.0, False
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or np.random.rand() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(np.random.beta(alpha, alpha)), use_cutmix

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) float, (B,) int -> mixed images, (B, num_classes) float targets."""
        lam, cutmix = self._lam()
        images = images.clone()
        if lam < 1.0 and cutmix:
            h, w = images.shape[-2:]
            cut = np.sqrt(1 - lam)
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = np.random.randint(h), np.random.randint(w)
            y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
            x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
            images[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
        elif lam < 1.0:
            images = images * lam + images.flip(0) * (1 - lam)
        off = self.label_smoothing / self.num_classes
        onehot = torch.full((labels.shape[0], self.num_classes), off, dtype=torch.float32, device=labels.device)
        onehot.scatter_(1, labels.view(-1, 1), 1.0 - self.label_smoothing + off)
        targets = onehot * lam + onehot.flip(0) * (1 - lam)
        if self.binarize:
            targets = (targets > self.bce_threshold).float()
        return images, targets
