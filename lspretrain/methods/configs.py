"""The typed ``method`` config sections, one dataclass per method; ``registry.METHODS`` maps
``method.name`` to its dataclass and its ``Method`` class.

Kept apart from the implementations: the config loader (``engine/config.py``) reads these
schemas, and the implementations import the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

__all__ = ["MethodConfig", "ClassificationConfig", "DINOv2Config"]


@dataclass
class MethodConfig:
    """What every ``method`` section has: its registry name, and the rules it imposes on the rest
    of the run, checked when the config is loaded."""

    name: str = ""

    def check_strategy(self, strategy: str) -> None:
        """Refuse (``ValueError``, one line) a ``strategy.name`` this method's settings cannot run under."""


@dataclass
class ClassificationConfig(MethodConfig):
    name: str = "classification"
    num_classes: int = 1000
    loss: Literal["ce", "bce"] = "ce"
    label_smoothing: float = 0.0
    bce_binarize: bool = True  # bce: targets > bce_threshold become 1 (DeiT-III: gt(0.0))
    bce_threshold: float = 0.0
    head_init_std: float = 0.01
    # data (webdataset only; the synthetic stream is used as is)
    augment: Literal["resize", "three_augment", "simple_random_crop"] = "resize"
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # three_augment crop area range
    color_jitter: float = 0.3
    mixup_alpha: float = 0.0  # 0 and cutmix_alpha 0: no Mixup/CutMix
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    repeats: int = 1  # repeated augmentation: views per decoded image (DeiT: 3)
    # where the batched photometrics and Mixup/CutMix run: "loader" (CPU workers), "device" (the
    # training device, on uint8 images), "auto" = device on CUDA (lspretrain/data/photometric.py)
    photometric: Literal["auto", "loader", "device"] = "auto"
    ema_momentum: float = 0.0  # model EMA; 0: none (DeiT: 0.99996)
    # initialization (fine-tuning): backbone file or run directory / checkpoint step directory, or
    # with init_from_format timm / dinov2 / hf a released plain checkpoint; specialized as model.spec
    # (lspretrain/methods/init_from.py)
    init_from: str = ""
    init_from_format: str = ""
    init_which: Optional[str] = None  # backbone in a training checkpoint: model / ema (lspretrain.convert)
    init_head: bool = False  # also take the head (a training checkpoint with the same num_classes)

    def __post_init__(self) -> None:
        def fail(key: str, expected: str) -> None:
            raise ValueError(f"method.{key}={getattr(self, key)!r}: expected {expected}")

        if self.loss not in ("ce", "bce"):
            fail("loss", "'ce' or 'bce'")
        if self.augment not in ("resize", "three_augment", "simple_random_crop"):
            fail("augment", "'resize', 'three_augment' or 'simple_random_crop'")
        if self.num_classes < 1:
            fail("num_classes", ">= 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            fail("label_smoothing", "a value in [0, 1)")
        if self.loss == "bce" and self.bce_binarize and self.label_smoothing > 0:
            fail("label_smoothing", "0 with loss=bce and bce_binarize=true (every class would be a positive)")
        if self.repeats < 1:
            fail("repeats", ">= 1")
        if not 0.0 <= self.ema_momentum < 1.0:
            fail("ema_momentum", "a value in [0, 1) (0: no EMA)")
        if len(self.rrc_scale) != 2 or not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            fail("rrc_scale", "[min, max] with 0 < min <= max <= 1")
        if self.init_head and not self.init_from:
            fail("init_head", "false without method.init_from")
        from .init_from import check_init_format

        check_init_format(self.init_from_format, "method.init_from_format")
        if self.init_from_format and not self.init_from:
            fail("init_from_format", "'' without method.init_from (the file to read)")

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


@dataclass
class DINOv2Config(MethodConfig):
    name: str = "dinov2"
    # heads: dinov2's configs/ssl_default_config.yaml (github.com/facebookresearch/dinov2); its
    # ViT-L/g recipes (configs/train/vitl16_short.yaml, vitg14.yaml) take 131,072 prototypes,
    # bottleneck 384 and a separate iBOT head
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
    # where the batched colour/blur/solarize augmentations run: "loader" (CPU workers), "device"
    # (the training device, on uint8 crops), "auto" = device on CUDA (lspretrain/data/photometric.py)
    photometric: Literal["auto", "loader", "device"] = "auto"
    # continued pretraining (lspretrain/methods/init_from.py): student and teacher backbones from
    # a backbone file or a run ("" format), or a released plain checkpoint (timm / dinov2 / hf),
    # specialized as model.spec; the heads fresh, or from head_init_from
    init_from: str = ""
    init_from_format: str = ""
    init_which: Optional[str] = None  # backbone / heads in a training checkpoint (default: the teacher)
    head_init_from: str = ""
    # the heads train alone for the first steps: the student backbone runs without autograd (no
    # gradient: AdamW and LAMB neither move nor decay it, its moments stay fresh); single / fsdp2
    freeze_backbone_steps: int = 0

    def __post_init__(self) -> None:
        from .init_from import check_init_format

        check_init_format(self.init_from_format, "method.init_from_format")
        if self.init_from_format and not self.init_from:
            raise ValueError(f"method.init_from_format={self.init_from_format!r} without method.init_from (the file to read)")
        if self.freeze_backbone_steps < 0:
            raise ValueError(f"method.freeze_backbone_steps={self.freeze_backbone_steps}: expected >= 0")

    def check_strategy(self, strategy: str) -> None:
        if self.freeze_backbone_steps and strategy in ("ddp", "deepspeed"):
            # DDP requires a gradient for every parameter each step, and ZeRO fills missing ones
            # with zeros that its optimizer then decays: neither leaves the backbone untouched.
            raise ValueError(f"method.freeze_backbone_steps={self.freeze_backbone_steps} needs strategy.name single or "
                             f"fsdp2 (a frozen backbone has no gradients), not {strategy}")
