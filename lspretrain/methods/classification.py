"""Supervised image classification, up to the DeiT-III recipe: a backbone plus a linear head on
the normalized CLS token.

Losses: cross-entropy with optional label smoothing (fine-tuning), or binary cross-entropy
(DeiT-III pretraining) on one-hot or Mixup/CutMix targets, binarized as DeiT-III does
(``targets.gt(0.0)``: both classes of a mixed pair are positives, whatever lambda).

Data (``build_loader``): ``augment`` picks the per-sample geometry (3-Augment's RandomResizedCrop
or Simple Random Crop; ``resize`` for none), whose batched photometric half (one of grayscale /
solarize / blur, then colour jitter) runs in ``SupervisedCollate`` together with Mixup/CutMix.

Repeated augmentation on a stream: each decoded image yields ``repeats`` independently augmented
views, adjacent in the same per-rank batch; the loader reads ``ceil(data.batch_size / repeats)``
distinct images per step, so the batch size (and every lr scaling) still counts views. DeiT's
RASampler instead sends the repeats of an index to different GPUs and shortens the epoch so the
step count is unchanged; here the step budget is also unchanged (``run.total_steps``), each image
is decoded once per ``repeats`` views (cheaper), and the loader's epochs pass ``repeats`` times
more slowly. The cost: the views of one image share a rank's micro-batch, so its gradient is a
little more correlated (harmless for LayerNorm ViTs, no batch statistics), and Mixup pairs image
i with B-1-i, another image except for the middle one when B/repeats is odd.

Optional model EMA (``ema_momentum`` > 0), updated by ``strategy.ema_update`` on local shards and
evaluated beside the model. ``init_from`` starts from a backbone file or a training run (the
positional embedding is resampled to this resolution: DeiT-III's 192 -> 224 px fine-tune).

A batch holds ``images`` (B, 3, H, W), ``labels`` (B,) and, with Mixup/CutMix, ``targets`` (B, K).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.config import DataConfig
from ..engine.config import EvalConfig, ModelConfig, SyntheticDataConfig
from ..models import build_backbone
from .base import Method
from .configs import ClassificationConfig

__all__ = ["ClassificationConfig", "Classification", "RepeatedViews", "RepeatedCollate", "topk_accuracy"]


@dataclass
class RepeatedViews:
    """Per-sample transform giving ``repeats`` independent views of one decoded image, stacked."""

    transform: Callable
    repeats: int

    def __call__(self, image) -> torch.Tensor:
        return torch.stack([self.transform(image) for _ in range(self.repeats)])


@dataclass
class RepeatedCollate:
    """Unstacks ``RepeatedViews`` samples into one sample per view (views of an image adjacent),
    keeping the first ``batch_size``: when it is not a multiple of the repeats, the last image
    gives fewer views (DeiT's 64 per GPU with 3 repeats)."""

    collate: Callable
    batch_size: int

    def __call__(self, samples: list[dict]) -> dict:
        views = [{**s, "image": view} for s in samples for view in s["image"]]
        return self.collate(views[: self.batch_size])


@torch.no_grad()
def topk_accuracy(backbone: nn.Module, head: nn.Module, batches: Iterable[dict], ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies (%) of ``head(backbone(images))`` over ``{"images", "labels"}`` batches."""
    was_training = backbone.training
    backbone.eval()
    weight = head.weight  # device and dtype of the (unsharded) parameters
    hits, n = torch.zeros(len(ks)), 0
    for batch in batches:
        logits = head(backbone(batch["images"].to(weight.device, weight.dtype)))
        top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices.cpu()
        hit = top == batch["labels"].view(-1, 1)
        hits += torch.tensor([hit[:, :k].any(-1).sum().item() for k in ks], dtype=torch.float32)
        n += len(batch["labels"])
    backbone.train(was_training)
    if not n:
        raise ValueError("topk_accuracy: the evaluation data gave no batch")
    return {f"top{k}": 100.0 * h.item() / n for k, h in zip(ks, hits)}


class Classification(Method):
    def __init__(self, cfg: ClassificationConfig, model_cfg: ModelConfig, total_steps: int = 1):
        # No schedule of its own reads total_steps: a classifier built outside a run needs none.
        super().__init__(cfg, model_cfg, total_steps)
        self.backbone = build_backbone(model_cfg.arch, model_cfg.spec, **model_cfg.overrides)
        self.head = nn.Linear(self.backbone.embed_dim, cfg.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=cfg.head_init_std)
        nn.init.zeros_(self.head.bias)
        if cfg.init_from:
            self._init_from(cfg.init_from)
        # Not optimized: follows the model through after_step (deep copy: same init, same sharding).
        self.ema = copy.deepcopy(nn.ModuleDict({"backbone": self.backbone, "head": self.head})).requires_grad_(False) \
            if cfg.ema_momentum > 0 else None

    def _init_from(self, path: str) -> None:
        from .init_from import init_backbone

        init_backbone(self.backbone, path, self.cfg.init_from_format, self.cfg.init_which)
        if self.cfg.init_head:
            head = _read_head(Path(path), "ema." if self.cfg.init_which == "ema" else "")
            if head["weight"].shape != self.head.weight.shape:
                raise ValueError(f"method.init_head=true: the head in {path} is {tuple(head['weight'].shape)} "
                                 f"(classes x width), this model's is {tuple(self.head.weight.shape)}; "
                                 "set method.init_head=false to start a fresh head")
            self.head.load_state_dict(head)

    def sharded_modules(self) -> list[nn.Module]:
        return [self.backbone] + ([self.ema.backbone] if self.ema is not None else [])

    def optimized_module(self) -> nn.Module:
        # Same parameter names as on the method, without the EMA copy.
        return nn.ModuleDict({"backbone": self.backbone, "head": self.head}) if self.ema is not None else self

    def forward(self, batch: dict, step: int):
        if batch["images"].dtype == torch.uint8:  # the loader left photometrics and mixing to this device
            batch = self._device_augment(batch)
        return super().forward(batch, step)

    def _device_augment(self, batch: dict) -> dict:
        """The transform's photometrics, then Mixup/CutMix, on the batch's device in fp32; the
        images cast to the dtype the patch embedding computes in (bf16 parameters under fsdp2 /
        deepspeed, whose input casts happened before this)."""
        photometric, mixup = getattr(self.transform(), "photometric", None), self.mixup()
        images, out = batch["images"], dict(batch)
        with torch.autocast(images.device.type, enabled=False):
            images = photometric(images) if photometric is not None else images.float()
            if mixup is not None:
                images, out["targets"] = mixup(images, batch["labels"])
        out["images"] = images.to(self.backbone.patch_embed.proj.weight.dtype)
        return out

    def get_student_output(self, batch: dict, step: int) -> torch.Tensor:
        return self.head(self.backbone(batch["images"]))

    def compute_losses(self, teacher, logits: torch.Tensor, batch: dict, step: int):
        logits, labels, targets = logits.float(), batch["labels"], batch.get("targets")
        smoothing = self.cfg.label_smoothing if targets is None else 0.0  # MixupCutmix smoothed its targets
        if self.cfg.loss == "bce":
            if targets is None:
                k = logits.shape[-1]
                targets = F.one_hot(labels, k).float() * (1.0 - smoothing) + smoothing / k
            loss = F.binary_cross_entropy_with_logits(logits, targets.float())
        else:
            loss = F.cross_entropy(logits, labels if targets is None else targets.float(), label_smoothing=smoothing)
        acc = (logits.argmax(-1) == labels).float().mean()
        return loss, {"loss_cls": loss.detach(), "acc1": acc}

    def after_step(self, step: int, strategy) -> None:
        if self.ema is not None:
            strategy.ema_update(self.ema, self.optimized_module(), self.cfg.ema_momentum)

    # -- evaluation ------------------------------------------------------------------------
    def evaluation_backbone(self) -> nn.Module:
        return self.backbone

    def evaluate(self, eval_cfg: EvalConfig) -> dict[str, float]:
        """Top-1/top-5 (%) on ``eval.shards``/``eval.index`` (resized to the model's resolution),
        of the model and of its EMA (``ema_top1``...). Every rank evaluates the same images."""
        from ..eval.data import evaluation_images

        if not hasattr(self, "_eval_batches"):  # decoded once when they fit in eval.cache_gib
            e = eval_cfg
            self._eval_batches = evaluation_images(e.shards, e.index, self.backbone.cfg.img_size, e.max_samples,
                                                   e.batch_size, e.cache_gib * 2**30)
        models = {"": (self.backbone, self.head)}
        if self.ema is not None:
            models["ema_"] = (self.ema.backbone, self.ema.head)
        with self.root_unsharded():
            return {prefix + k: v for prefix, (backbone, head) in models.items()
                    for k, v in topk_accuracy(backbone, head, self._eval_batches).items()}

    # -- data and accounting ------------------------------------------------------------
    def build_loader(self, data: DataConfig | SyntheticDataConfig, run_device: str, rank: int, world_size: int):
        if isinstance(data, SyntheticDataConfig):
            from ..engine.synthetic import SyntheticLoader

            return SyntheticLoader(data.batch_size, data.img_size, data.num_classes, data.seed, rank, world_size)
        from ..data import SupervisedCollate, build_loader
        from ..data.photometric import photometric_on_device

        r = self.cfg.repeats
        transform = self.transform()
        if photometric_on_device(self.cfg.photometric, run_device) and hasattr(transform, "photometric"):
            collate = SupervisedCollate()  # uint8 images: see _device_augment
        else:
            collate = SupervisedCollate(photometric=getattr(transform, "photometric", None), mixup=self.mixup())
        if r > 1:  # batch_size counts views: read ceil(batch_size / repeats) images
            transform, collate = RepeatedViews(transform, r), RepeatedCollate(collate, data.batch_size)
            data = dataclasses.replace(data, batch_size=-(-data.batch_size // r))
        return build_loader(data, transform, collate, rank=rank, world_size=world_size)

    def transform(self):
        """Per-sample geometry at the model's resolution; ``.photometric`` (if any) is batched."""
        from ..data import EvalTransform, SimpleRandomCrop, ThreeAugment, ThreeAugmentPhotometric

        c, size = self.cfg, self.backbone.cfg.img_size
        photometric = ThreeAugmentPhotometric(jitter=c.color_jitter)
        if c.augment == "three_augment":
            return ThreeAugment(size=size, scale=tuple(c.rrc_scale), photometric=photometric)
        if c.augment == "simple_random_crop":
            return SimpleRandomCrop(size=size, photometric=photometric)
        return EvalTransform(size=size, crop_pct=1.0)  # resize + normalize, no augmentation

    def mixup(self):
        from ..data import MixupCutmix

        c = self.cfg
        if not c.mixes:
            return None
        binarize = c.loss == "bce" and c.bce_binarize
        return MixupCutmix(num_classes=c.num_classes, mixup_alpha=c.mixup_alpha, cutmix_alpha=c.cutmix_alpha,
                           prob=c.mixup_prob, switch_prob=c.mixup_switch_prob, label_smoothing=c.label_smoothing,
                           binarize=binarize, bce_threshold=c.bce_threshold)

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


def _read_head(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """``head.weight``/``head.bias`` (or ``ema.head.*``) of a DCP training checkpoint: a run
    directory (newest complete step), a ``step_N`` directory or its ``state/``."""
    from ..convert.sources import is_dcp, strategy_dir
    from ..engine.safe_load import dcp_load, read_dcp_metadata

    state = strategy_dir(path)
    if not is_dcp(state):
        raise ValueError(f"method.init_head=true needs a DCP training checkpoint (fsdp2/ddp/single); {state} is not one")
    meta = read_dcp_metadata(state).state_dict_metadata  # refuses metadata that carries code
    keys = {f"model.{prefix}head.{n}": n for n in ("weight", "bias")}
    if not all(k in meta for k in keys):
        raise ValueError(f"method.init_head=true: {state} has no {sorted(keys)}")
    sd = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in keys}
    dcp_load(sd, state, no_dist=True)
    return {n: sd[k].float() for k, n in keys.items()}
