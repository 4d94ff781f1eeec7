"""DINOv2 self-supervised pretraining (DINO + iBOT + KoLeo), for plain and specialized ViTs.

Implements the ``Method`` protocol (``methods/base.py``). The meta-architecture is split the dinov3 way: ``get_teacher_output`` (no grad, centred and
sharpened targets), ``get_student_output`` (masked globals + locals through the student),
``compute_losses``. The teacher is an EMA of the student (same specialization preset); the
update goes through the strategy so it works on sharded parameters. ``init_from`` continues
pretraining from released or trained weights (``methods/init_from.py``), with the heads trained
alone for ``freeze_backbone_steps``.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from ..data.config import DataConfig
from ..engine.config import EvalConfig, ModelConfig
from ..models import build_backbone
from ..models.heads import DINOHead
from ..models.vit import DropPath
from .base import Method
from .configs import DINOv2Config
from .ssl_losses import SoftmaxCenter, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp

__all__ = ["DINOv2Config", "DINOv2", "teacher_momentum", "teacher_temperature"]


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


def _fresh_optimizer_state(optimizer: torch.optim.Optimizer, params) -> None:
    """Give ``params`` (the frozen backbone's, which have had no gradient yet) the state AdamW and
    LAMB create at a first gradient: step 0 and zero moments, which update exactly as no state.
    A checkpoint taken while the backbone is frozen then holds optimizer state for every
    parameter, as a resumed run expects: DCP loads the state of every parameter of its fresh
    optimizer, so a missing entry would make the resume fail."""
    from ..engine.optim import Lamb

    if not isinstance(optimizer, (torch.optim.AdamW, Lamb)):
        raise TypeError(f"method.freeze_backbone_steps: optimizer {type(optimizer).__name__} (AdamW or LAMB expected)")
    for p in params:
        if not optimizer.state.get(p):
            optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                  "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                  "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def _masked_patches(patches: torch.Tensor, batch: dict) -> torch.Tensor:
    """The (M, C) tokens of the masked patches, in ``masks.nonzero()`` order: selected by the
    collate's ``mask_indices`` (a boolean index would read the device from the host)."""
    return patches.flatten(0, 1).index_select(0, batch["mask_indices"])


class _Branch(nn.Module):
    """One side of the meta-architecture: a backbone and its heads."""

    def __init__(self, backbone: nn.Module, cfg: DINOv2Config):
        super().__init__()
        dim = backbone.embed_dim
        self.backbone = backbone
        head = lambda: DINOHead(dim, cfg.head_prototypes, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_nlayers)
        self.dino_head = head()
        self.ibot_head = head() if cfg.ibot_separate_head else None

    def patch_head(self) -> DINOHead:
        return self.ibot_head if self.ibot_head is not None else self.dino_head

    def heads(self) -> list[DINOHead]:
        return [h for h in (self.dino_head, self.ibot_head) if h is not None]


class DINOv2(Method):
    """Student and EMA teacher (same specialization preset) with DINO/iBOT heads."""

    def __init__(self, cfg: DINOv2Config, model_cfg: ModelConfig, total_steps: int):
        super().__init__(cfg, model_cfg, total_steps)  # the teacher momentum's cosine spans the run
        overrides = {"mask_token": True, **model_cfg.overrides}
        self.student = _Branch(build_backbone(model_cfg.arch, model_cfg.spec, **overrides), cfg)
        if cfg.init_from or cfg.head_init_from:
            from .init_from import init_backbone, init_heads

            if cfg.init_from:
                init_backbone(self.student.backbone, cfg.init_from, cfg.init_from_format, cfg.init_which)
            if cfg.head_init_from:
                heads = {"dino_head": self.student.dino_head}
                if self.student.ibot_head is not None:
                    heads["ibot_head"] = self.student.ibot_head
                init_heads(heads, cfg.head_init_from, cfg.init_which)
        # After any init_from: the teacher starts as an exact copy of the student.
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        # The teacher never drops paths: it sees the full network, as in DINOv2.
        for module in self.teacher.modules():
            if isinstance(module, DropPath):
                module.p = 0.0
        if cfg.centering == "softmax":
            self.dino_center = SoftmaxCenter(cfg.head_prototypes, cfg.center_momentum)
            self.ibot_center = SoftmaxCenter(cfg.head_prototypes, cfg.center_momentum)

    # -- what the strategy needs ----------------------------------------------------------
    def sharded_modules(self) -> list[nn.Module]:
        return [self.student.backbone, self.teacher.backbone]

    def optimized_module(self) -> nn.Module:
        return self.student

    # -- the step ----------------------------------------------------------------------------
    def forward(self, batch: dict, step: int):
        if batch["global_crops"].dtype == torch.uint8:  # the loader left the photometrics to this device
            batch = self._device_photometrics(batch)
        return super().forward(batch, step)

    def _device_photometrics(self, batch: dict) -> dict:
        """DINOv2's view photometrics (global 1, global 2, locals) on the batch's device, in
        fp32, then cast to the dtype the patch embedding computes in (bf16 parameters under
        fsdp2 / deepspeed, whose input casts happened before this)."""
        from ..data import DINOv2MultiCrop

        g1, g2, lp = DINOv2MultiCrop().photometric
        g, loc = batch["global_crops"], batch["local_crops"]
        dtype = self.student.backbone.patch_embed.proj.weight.dtype
        b = g.shape[0] // 2
        with torch.autocast(g.device.type, enabled=False):
            g = torch.cat([g1(g[:b]), g2(g[b:])])
            loc = lp(loc) if loc.numel() else loc.float()
        return {**batch, "global_crops": g.to(dtype), "local_crops": loc.to(dtype)}

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
        out = self.teacher.backbone.forward_features(batch["global_crops"])
        cls_logits = self.teacher.dino_head(out["cls_norm"])
        patch_logits = self.teacher.patch_head()(_masked_patches(out["patches_norm"], batch))
        return {
            "dino": self._center("dino", cls_logits, temp).chunk(2),
            "ibot": self._center("ibot", patch_logits, temp),
            "temp": temp,
        }

    # -- student ---------------------------------------------------------------------------
    def get_student_output(self, batch: dict, step: int) -> dict:
        """Student logits for every crop (globals masked for iBOT) and the global CLS tokens."""
        for head in self.student.heads():
            head.freeze_last_layer = step < self.cfg.freeze_last_layer_steps
        masks = batch["masks"]
        # A frozen backbone runs without autograd: its parameters get no gradient at all (None,
        # not zero), which torch's AdamW and our LAMB skip, weight decay included.
        frozen = step < self.cfg.freeze_backbone_steps
        with torch.no_grad() if frozen else contextlib.nullcontext():
            glob = self.student.backbone.forward_features(batch["global_crops"], masks=masks)
            cls_tokens = [glob["cls_norm"]]
            if batch["local_crops"].numel():
                cls_tokens.append(self.student.backbone.forward_features(batch["local_crops"])["cls_norm"])
        # One head pass over every crop's CLS token (the head is the same for all of them).
        logits = self.student.dino_head(torch.cat(cls_tokens))
        n_images = batch["global_crops"].shape[0] // 2
        return {
            "dino": list(logits.split(n_images)),  # 2 global crops, then the local crops
            "ibot": self.student.patch_head()(_masked_patches(glob["patches_norm"], batch)),
            "global_cls": glob["cls_norm"],
        }

    # -- losses ------------------------------------------------------------------------------
    def compute_losses(self, teacher: dict, student: dict, batch: dict, step: int):
        cfg = self.cfg
        dino = dino_loss(student["dino"], list(teacher["dino"]), cfg.student_temp)
        ibot = ibot_loss(student["ibot"], teacher["ibot"], batch["masks"], cfg.student_temp, batch["mask_indices"])
        koleo = sum(koleo_loss(c) for c in student["global_cls"].chunk(2))
        total = cfg.dino_loss_weight * dino + cfg.ibot_loss_weight * ibot + cfg.koleo_loss_weight * koleo
        metrics = {"loss/dino": dino.detach(), "loss/ibot": ibot.detach(), "loss/koleo": koleo.detach(),
                   "dino/teacher_temp": dino.new_full((), teacher["temp"])}  # on the loss's device, filled there
        return total, metrics

    # -- after the optimizer step --------------------------------------------------------------
    def momentum(self, step: int) -> float:
        return teacher_momentum(self.cfg, step, self.total_steps)

    def after_step(self, step: int, strategy) -> None:
        if step < self.cfg.freeze_backbone_steps:
            _fresh_optimizer_state(strategy.optimizer, self.student.backbone.parameters())
        strategy.ema_update(self.teacher, self.student, self.momentum(step))

    # -- evaluation ------------------------------------------------------------------------
    def evaluation_backbone(self) -> nn.Module:
        return self.teacher.backbone  # the EMA teacher: the model DINOv2 evaluates and releases

    def evaluate(self, eval_cfg: EvalConfig) -> dict[str, float]:
        """k-NN (k = 20, cosine, T = 0.07) of the teacher's CLS features: reference images from
        ``eval.train_shards``/``eval.train_index``, queries from ``eval.shards``/``eval.index``."""
        from ..eval import extract_features, knn_accuracy
        from ..eval.data import evaluation_images

        if not hasattr(self, "_eval_sets"):  # decoded once when they fit in eval.cache_gib
            e, size = eval_cfg, self.cfg.global_crop_size
            if not (e.train_shards or e.train_index):
                raise ValueError("DINOv2 k-NN evaluation needs eval.train_shards or eval.train_index (labelled reference images)")
            self._eval_sets = [evaluation_images(shards, index, size, e.max_samples, e.batch_size, e.cache_gib * 2**30)
                               for shards, index in ((e.train_shards, e.train_index), (e.shards, e.index))]
        device = next(self.teacher.parameters()).device
        with self.root_unsharded():
            (xtr, ytr), (xte, yte) = (extract_features(self.teacher.backbone, batches, device) for batches in self._eval_sets)
        acc = knn_accuracy(xtr, ytr, xte, yte, k=20, temperature=0.07)
        return {"knn_top1": acc["top1"], "knn_top5": acc["top5"]}

    # -- data and accounting ----------------------------------------------------------------
    def build_loader(self, data: DataConfig, run_device: str, rank: int, world_size: int):
        from ..data import DINOv2Collate, DINOv2MultiCrop, build_loader
        from ..data.photometric import photometric_on_device

        c = self.cfg
        crops = DINOv2MultiCrop(global_size=c.global_crop_size, local_size=c.local_crop_size, n_local=c.n_local_crops,
                                global_scale=tuple(c.global_crops_scale), local_scale=tuple(c.local_crops_scale))
        on_device = photometric_on_device(c.photometric, run_device)
        collate = DINOv2Collate(patch_size=self.student.backbone.cfg.patch_size, global_size=c.global_crop_size,
                                photometric=None if on_device else crops.photometric, mask_ratio=tuple(c.mask_ratio_min_max),
                                mask_probability=c.mask_probability)
        return build_loader(data, crops, collate, rank=rank, world_size=world_size)

    def train_flops_per_sample(self) -> float:
        """Student forward+backward on 2 global and n local crops, teacher forward on 2 globals
        (heads excluded: small next to the backbone)."""
        from ..accounting import flop_counter_flops

        with torch.device("meta"):
            backbone = build_backbone(self.model_cfg.arch, self.model_cfg.spec, **{"mask_token": True, **self.model_cfg.overrides})
        c = self.cfg
        train_g = flop_counter_flops(backbone.train(), c.global_crop_size, backward=True)
        train_l = flop_counter_flops(backbone, c.local_crop_size, backward=True) if c.n_local_crops else 0
        teacher_g = flop_counter_flops(backbone.eval(), c.global_crop_size)
        return float(2 * train_g + c.n_local_crops * train_l + 2 * teacher_g)

    def tokens_per_sample(self) -> int:
        p = self.student.backbone.cfg.patch_size
        c, prefix = self.cfg, self.student.backbone.num_prefix_tokens
        return 2 * ((c.global_crop_size // p) ** 2 + prefix) + c.n_local_crops * ((c.local_crop_size // p) ** 2 + prefix)
