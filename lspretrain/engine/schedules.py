"""Step-indexed schedules: pure functions of the optimizer step, so the step counter saved in
a checkpoint is all the state a resumed run needs to continue every schedule exactly.

- ``cosine_schedule``: linear warmup, then a half cosine that reaches ``final`` at
  ``total_steps`` and stays there.
- ``Schedule``: the same for recipe scalars (teacher momentum, teacher temperature), with a
  ``kind`` of cosine / linear / constant after the warmup.
- ``ScheduleSet`` / ``apply_schedules``: the lr and weight-decay schedules of an
  ``OptimConfig``, written into every optimizer group scaled by the group's ``lr_scale`` /
  ``wd_scale`` (see ``lspretrain.engine.optim.param_groups``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .optim import OptimConfig, scaled_lr

__all__ = ["cosine_schedule", "Schedule", "ScheduleSet", "apply_schedules"]

_KINDS = ("cosine", "linear", "constant")


def _check(kind: str, total_steps: int, warmup_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}: expected >= 1")
    # A warmup longer than the run only makes sense when nothing follows it (a short run
    # of a recipe whose teacher-temperature warmup is counted in epochs).
    if warmup_steps < 0 or (kind != "constant" and warmup_steps > total_steps):
        raise ValueError(f"warmup_steps={warmup_steps}: expected 0 <= warmup_steps <= total_steps={total_steps}")


def _value(step: int, kind: str, base: float, final: float, total_steps: int, warmup_steps: int, warmup_start: float) -> float:
    _check(kind, total_steps, warmup_steps)
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    if kind == "constant":
        return base
    if step >= total_steps:
        return final
    t = (step - warmup_steps) / (total_steps - warmup_steps)
    if kind == "linear":
        return base + (final - base) * t
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * t))


def cosine_schedule(
    step: int, *, base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> float:
    """Linear warmup ``warmup_start -> base`` over steps ``[0, warmup_steps]`` (``base`` at
    ``warmup_steps``), then a half cosine ``base -> final`` reaching ``final`` at
    ``total_steps``; ``final`` for every later step."""
    return _value(step, "cosine", base, final, total_steps, warmup_steps, warmup_start)


@dataclass(frozen=True)
class Schedule:
    """A scalar schedule. After an optional linear warmup ``warmup_start -> base``:
    ``cosine`` / ``linear`` go ``base -> final`` reaching ``final`` at ``total_steps``,
    ``constant`` stays at ``base`` (``final`` unused).

    DINOv2 examples (1,250 steps per epoch):
    teacher momentum ``Schedule(base=0.992, final=1.0)`` (cosine);
    teacher temperature ``Schedule(base=0.07, final=0.07, warmup_steps=30 * 1250,
    warmup_start=0.04, kind="constant")`` (0.04 -> 0.07 over 30 epochs, then constant).
    """

    base: float
    final: float
    warmup_steps: int = 0
    warmup_start: float = 0.0
    kind: str = "cosine"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Schedule.kind={self.kind!r}: expected one of {_KINDS}")
        if self.warmup_steps < 0:
            raise ValueError(f"Schedule.warmup_steps={self.warmup_steps}: expected >= 0")

    def __call__(self, step: int, total_steps: int) -> float:
        return _value(step, self.kind, self.base, self.final, total_steps, self.warmup_steps, self.warmup_start)


@dataclass(frozen=True)
class ScheduleSet:
    """The lr and weight-decay schedules of one run. Only the peak lr is scaled with the batch
    (``scaled_lr``); ``min_lr`` and ``warmup_start_lr`` are absolute, as in dinov2 and deit.
    Weight decay follows a cosine ``weight_decay -> weight_decay_end`` over the whole run
    without warmup (DINOv2), or stays constant when ``weight_decay_end`` is None."""

    lr: Schedule
    wd: Schedule

    @classmethod
    def from_config(cls, cfg: OptimConfig, global_batch_size: int) -> "ScheduleSet":
        lr = Schedule(
            base=scaled_lr(cfg, global_batch_size), final=cfg.min_lr, warmup_steps=cfg.warmup_steps, warmup_start=cfg.warmup_start_lr
        )
        if cfg.weight_decay_end is None:
            wd = Schedule(base=cfg.weight_decay, final=cfg.weight_decay, kind="constant")
        else:
            wd = Schedule(base=cfg.weight_decay, final=cfg.weight_decay_end)
        return cls(lr=lr, wd=wd)

    def apply(self, optimizer: torch.optim.Optimizer, step: int, total_steps: int) -> dict[str, float]:
        """Write the values for optimizer step ``step`` into every group (times the group's
        ``lr_scale`` / ``wd_scale``, 1.0 when absent) and return ``{"lr", "wd"}`` for logging:
        the lr of the group with the largest ``lr_scale`` and the unscaled weight decay."""
        lr, wd = self.lr(step, total_steps), self.wd(step, total_steps)
        peak = 0.0
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            group["weight_decay"] = wd * group.get("wd_scale", 1.0)
            peak = max(peak, group["lr"])
        return {"lr": peak, "wd": wd}


def apply_schedules(
    optimizer: torch.optim.Optimizer, step: int, cfg: OptimConfig, total_steps: int, global_batch_size: int
) -> dict[str, float]:
    """``ScheduleSet.from_config(cfg, global_batch_size).apply(optimizer, step, total_steps)``.
    Call it before each ``optimizer.step()``; ``step`` counts optimizer steps from 0."""
    return ScheduleSet.from_config(cfg, global_batch_size).apply(optimizer, step, total_steps)
