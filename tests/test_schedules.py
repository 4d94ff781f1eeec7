"""Step-indexed lr / wd / scalar schedules."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lspretrain.engine.optim import OptimConfig
from lspretrain.engine.schedules import Schedule, ScheduleSet, apply_schedules, cosine_schedule


def test_cosine_schedule_values() -> None:
    kw = dict(base=1.0, final=0.1, total_steps=110, warmup_steps=10, warmup_start=0.2)
    assert cosine_schedule(0, **kw) == pytest.approx(0.2)
    assert cosine_schedule(5, **kw) == pytest.approx(0.6)
    assert cosine_schedule(10, **kw) == pytest.approx(1.0)  # warmup end = base
    assert cosine_schedule(60, **kw) == pytest.approx(0.55)  # cosine midpoint = (base + final) / 2
    assert cosine_schedule(35, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert cosine_schedule(110, **kw) == pytest.approx(0.1)
    assert cosine_schedule(10_000, **kw) == 0.1
    assert cosine_schedule(0, base=2.0, final=0.0, total_steps=4) == 2.0  # no warmup
    with pytest.raises(ValueError, match="warmup_steps=20"):
        cosine_schedule(0, base=1.0, final=0.0, total_steps=10, warmup_steps=20)


def test_schedule_kinds() -> None:
    momentum = Schedule(base=0.992, final=1.0)
    assert momentum(0, 100) == pytest.approx(0.992)
    assert momentum(50, 100) == pytest.approx(0.996)
    assert momentum(100, 100) == 1.0 and momentum(150, 100) == 1.0
    lin = Schedule(base=1.0, final=0.0, warmup_steps=10, warmup_start=0.0, kind="linear")
    assert [lin(s, 110) for s in (5, 10, 35, 110, 200)] == pytest.approx([0.5, 1.0, 0.75, 0.0, 0.0])
    temp = Schedule(base=0.07, final=0.07, warmup_steps=30, warmup_start=0.04, kind="constant")
    assert [temp(s, 100) for s in (0, 15, 30, 99)] == pytest.approx([0.04, 0.055, 0.07, 0.07])
    assert temp(15, 20) == pytest.approx(0.055)  # a warmup longer than a short run is fine when constant
    with pytest.raises(ValueError, match="kind='step'"):
        Schedule(base=1.0, final=0.0, kind="step")


def _optimizer() -> torch.optim.Optimizer:
    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    return torch.optim.AdamW([
        {"params": [a], "lr_scale": 1.0, "wd_scale": 1.0},
        {"params": [b], "lr_scale": 0.25, "wd_scale": 0.0},
        {"params": [c], "lr_scale": 0.5, "wd_scale": 1.0},
    ])


def test_apply_schedules_sets_scaled_group_values() -> None:
    cfg = OptimConfig(lr=2e-4, lr_scaling="sqrt", min_lr=1e-6, warmup_steps=10, weight_decay=0.04, weight_decay_end=0.2)
    opt = _optimizer()
    peak = 2e-4 * math.sqrt(4096 / 1024)
    out = apply_schedules(opt, 10, cfg, total_steps=110, global_batch_size=4096)
    assert out["lr"] == pytest.approx(peak)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([peak, peak * 0.25, peak * 0.5])
    wd10 = 0.2 + 0.5 * (0.04 - 0.2) * (1 + math.cos(math.pi * 10 / 110))  # wd cosine has no warmup
    assert out["wd"] == pytest.approx(wd10)
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([wd10, 0.0, wd10])
    out = apply_schedules(opt, 5, cfg, total_steps=110, global_batch_size=4096)
    assert out["lr"] == pytest.approx(peak / 2)  # warmup from warmup_start_lr = 0
    out = apply_schedules(opt, 110, cfg, total_steps=110, global_batch_size=4096)
    assert out == pytest.approx({"lr": 1e-6, "wd": 0.2})  # min_lr is absolute, not batch-scaled
    assert opt.param_groups[1]["lr"] == pytest.approx(0.25e-6)


def test_schedule_set_constant_wd() -> None:
    sched = ScheduleSet.from_config(OptimConfig(lr=1e-3, weight_decay=0.05), global_batch_size=1024)
    assert [sched.wd(s, 100) for s in (0, 50, 100)] == [0.05, 0.05, 0.05]
    assert sched.lr(0, 100) == 1e-3 and sched.lr(100, 100) == 0.0
