"""DINOv2 self-supervised pretraining (DINO + iBOT + KoLeo), for plain and specialized ViTs.

The meta-architecture is split the dinov3 way: ``get_teacher_output`` (no grad, centred and
sharpened targets), ``get_student_output`` (masked globals + locals through the student),
``compute_losses``. The teacher is an EMA of the student (same specialization preset); the
update goes through the strategy so it works on sharded parameters.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..models import build_backbone
from ..models.heads import DINOHead
from ..models.vit import DropPath
from .ssl_losses import SoftmaxCenter, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp

__all__ = ["DINOv2Config", "DINOv2", "teacher_momentum", "teacher_temperature"]


@dataclass
class DINOv2Config:
    # heads (REFERENCE.md §2: 65,536 prototypes, 131,072 and bottleneck 384 for L/g)
    head_prototypes: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    ibot_separate_head: bool = False
    # losses
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    student_temp: float = 0.1
    centering: Literal["sinkhorn_knopp", "softmax"] = "sinkhorn_knopp"
    center_momentum: float = 0.9  # softmax centering only
    # teacher: temperature warmup 0.04 -> 0.07, EMA momentum cosine 0.992 -> 1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 37500  # 30 "epochs" of 1,250 iterations
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    freeze_last_layer_steps: int = 1250  # the first "epoch"
    # crops (the data side reads these too)
    global_crop_size: int = 224
    local_crop_size: int = 96
    n_local_crops: int = 8
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    mask_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)


def teacher_temperature(cfg: DINOv2Config, step: int) -> float:
    """Linear warmup from ``warmup_teacher_temp`` to ``teacher_temp``, then constant."""
    if step >= cfg.warmup_teacher_temp_steps:
        return cfg.teacher_temp
    frac = step / max(cfg.warmup_teacher_temp_steps, 1)
    return cfg.warmup_teacher_temp + frac * (cfg.teacher_temp - cfg.warmup_teacher_temp)


def teacher_momentum(cfg: DINOv2Config, step: int, total_steps: int) -> float:
    """Cosine from ``momentum_teacher`` to ``final_momentum_teacher`` over the run."""
    frac = min(step / max(total_steps, 1), 1.0)
    return cfg.final_momentum_teacher - (cfg.final_momentum_teacher - cfg.momentum_teacher) * (math.cos(math.pi * frac) + 1) / 2


class _Branch(nn.Module):
    """One side of the meta-architecture: a backbone and its heads."""

    def __init__(self, backbone: nn.Module, cfg: DINOv2Config):
        super().__init__()
        dim = backbone.embed_dim
        self.backbone = backbone
        self.dino_head = DINOHead(dim, cfg.head_prototypes, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_nlayers)
        self.ibot_head = (
            DINOHead(dim, cfg.head_prototypes, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_nlayers)
            if cfg.ibot_separate_head
            else None
        )

    def patch_head(self) -> DINOHead:
        return self.ibot_head if self.ibot_head is not None else self.dino_head


class DINOv2(nn.Module):
    """Student and EMA teacher with DINO/iBOT heads; ``forward(batch, step)`` -> (loss, metrics)."""

    def __init__(self, cfg: DINOv2Config, arch: str, spec: str = "none", total_steps: int = 1, **vit_overrides):
        super().__init__()
        self.cfg = cfg
        self.total_steps = total_steps
        vit_overrides.setdefault("mask_token", True)
        self.student = _Branch(build_backbone(arch, spec, **vit_overrides), cfg)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        # The teacher never drops paths: it sees the full network, as in DINOv2.
        for module in self.teacher.modules():
            if isinstance(module, DropPath):
                module.p = 0.0
        if cfg.centering == "softmax":
            self.dino_center = SoftmaxCenter(cfg.head_prototypes, cfg.center_momentum)
            self.ibot_center = SoftmaxCenter(cfg.head_prototypes, cfg.center_momentum)

    # -- teacher ---------------------------------------------------------------------------
    def _center(self, which: str, logits: torch.Tensor, temp: float) -> torch.Tensor:
        if self.cfg.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp)
        return getattr(self, f"{which}_center")(logits, temp)

    @torch.no_grad()
    def get_teacher_output(self, batch: dict, step: int) -> dict:
        """Centred, sharpened teacher targets for the global crops: one (B, K) tensor per
        crop (DINO), and (M, K) for the M masked patches (iBOT)."""
        temp = teacher_temperature(self.cfg, step)
        crops = batch["global_crops"]
        out = self.teacher.backbone.forward_features(crops)
        cls_logits = self.teacher.dino_head(out["cls_norm"])
        masks = batch["masks"]
        patch_logits = self.teacher.patch_head()(out["patches_norm"][masks])
        n_global = 2
        return {
            "dino": self._center("dino", cls_logits, temp).chunk(n_global),
            "ibot": self._center("ibot", patch_logits, temp),
            "temp": temp,
        }

    # -- student ---------------------------------------------------------------------------
    def get_student_output(self, batch: dict) -> dict:
        """Student logits for every crop (globals masked for iBOT) and the global CLS tokens."""
        masks = batch["masks"]
        glob = self.student.backbone.forward_features(batch["global_crops"], masks=masks)
        cls_tokens = [glob["cls_norm"]]
        if batch.get("local_crops") is not None and batch["local_crops"].numel():
            cls_tokens.append(self.student.backbone.forward_features(batch["local_crops"])["cls_norm"])
        # One head pass over every crop's CLS token (the head is the same for all of them).
        logits = self.student.dino_head(torch.cat(cls_tokens))
        n_images = batch["global_crops"].shape[0] // 2
        return {
            "dino": list(logits.split(n_images)),  # 2 global crops, then the local crops
            "ibot": self.student.patch_head()(glob["patches_norm"][masks]),
            "global_cls": glob["cls_norm"],
        }

    # -- losses ------------------------------------------------------------------------------
    def compute_losses(self, teacher: dict, student: dict, batch: dict) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        losses = {"dino": dino_loss(student["dino"], list(teacher["dino"]), cfg.student_temp)}
        if batch["masks"].any():
            losses["ibot"] = ibot_loss(student["ibot"], teacher["ibot"], batch["masks"], cfg.student_temp)
        else:
            losses["ibot"] = student["ibot"].sum() * 0.0
        losses["koleo"] = sum(koleo_loss(c) for c in student["global_cls"].chunk(2))
        losses["total"] = cfg.dino_loss_weight * losses["dino"] + cfg.ibot_loss_weight * losses["ibot"] + cfg.koleo_loss_weight * losses["koleo"]
        return losses

    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        teacher = self.get_teacher_output(batch, step)
        student = self.get_student_output(batch)
        losses = self.compute_losses(teacher, student, batch)
        metrics = {f"loss/{k}": v.detach() for k, v in losses.items() if k != "total"}
        metrics["dino/teacher_temp"] = teacher["temp"]
        return losses["total"], metrics

    # -- hooks around the optimizer step -----------------------------------------------------
    def before_optimizer_step(self, step: int) -> None:
        """DINOv2 freezes the prototypes (the heads' last layer) for the first epoch."""
        if step < self.cfg.freeze_last_layer_steps:
            for head in (self.student.dino_head, self.student.ibot_head):
                if head is not None:
                    head.last_layer.weight.grad = None

    def momentum(self, step: int) -> float:
        return teacher_momentum(self.cfg, step, self.total_steps)
