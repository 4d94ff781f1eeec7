"""The DINOv2 method: teacher/student set-up, EMA, last-layer freeze, losses on real batches."""
import numpy as np
import pytest
import torch
from PIL import Image

from lspretrain.data import DINOv2Collate, DINOv2MultiCrop
from lspretrain.engine.config import ModelConfig
from lspretrain.engine.strategies.base import Strategy
from lspretrain.methods.dinov2 import DINOv2, DINOv2Config, teacher_momentum, teacher_temperature

TINY = dict(embed_dim=48, depth=3, num_heads=3, img_size=32, patch_size=8, num_registers=1)


def tiny_cfg(**kw):
    base = dict(head_prototypes=128, head_hidden_dim=64, head_bottleneck_dim=32, global_crop_size=32,
                local_crop_size=16, n_local_crops=2, warmup_teacher_temp_steps=10, freeze_last_layer_steps=2)
    return DINOv2Config(**{**base, **kw})


def tiny_method(spec="paper", **kw):
    torch.manual_seed(0)
    return DINOv2(tiny_cfg(**kw), ModelConfig(arch="vit_tiny_patch14", spec=spec, overrides=dict(TINY)), total_steps=10)


def real_batch(cfg, n=4, seed=0):
    rng = np.random.default_rng(seed)
    crops = DINOv2MultiCrop(global_size=cfg.global_crop_size, local_size=cfg.local_crop_size, n_local=cfg.n_local_crops)
    collate = DINOv2Collate(patch_size=8, global_size=cfg.global_crop_size, photometric=crops.photometric)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]
    return collate([{"image": crops(im), "label": i, "key": str(i)} for i, im in enumerate(images)])


class _EMAOnly:
    ema_update = Strategy.ema_update


def test_teacher_starts_equal_and_follows_the_ema_formula():
    m = tiny_method()
    s_params = dict(m.student.named_parameters())
    for name, t in m.teacher.named_parameters():
        assert torch.equal(t, s_params[name]) and not t.requires_grad
    assert any("cls_" in n for n in s_params)  # the teacher is specialized like the student
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in m.teacher.named_parameters()}
    mom = m.momentum(3)
    assert mom == pytest.approx(teacher_momentum(m.cfg, 3, 10))
    m.after_step(3, _EMAOnly())
    for name, t in m.teacher.named_parameters():
        torch.testing.assert_close(t, mom * before[name] + (1 - mom) * s_params[name], rtol=0, atol=1e-6)


def test_schedules():
    cfg = tiny_cfg(warmup_teacher_temp_steps=10)
    assert teacher_temperature(cfg, 0) == pytest.approx(0.04)
    assert teacher_temperature(cfg, 5) == pytest.approx(0.055)
    assert teacher_temperature(cfg, 10) == teacher_temperature(cfg, 99) == pytest.approx(0.07)
    assert teacher_momentum(cfg, 0, 100) == pytest.approx(0.992)
    assert teacher_momentum(cfg, 50, 100) == pytest.approx(0.996)
    assert teacher_momentum(cfg, 100, 100) == pytest.approx(1.0)


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "softmax"])
def test_losses_finite_and_last_layer_frozen_then_free(centering):
    m = tiny_method(centering=centering, ibot_separate_head=True)
    batch = real_batch(m.cfg)
    assert batch["masks"].any()
    loss, metrics = m(batch, step=0)
    assert torch.isfinite(loss) and set(metrics) >= {"loss/dino", "loss/ibot", "loss/koleo"}
    expected = metrics["loss/dino"] + metrics["loss/ibot"] + 0.1 * metrics["loss/koleo"]
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    heads = m.student.heads()
    assert len(heads) == 2
    for head in heads:  # step 0 < freeze_last_layer_steps: prototypes get exactly zero gradient
        assert torch.count_nonzero(head.last_layer.weight.grad) == 0
        assert head.mlp[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.teacher.parameters())
    m.zero_grad()
    m(batch, step=2)[0].backward()
    for head in heads:
        assert head.last_layer.weight.grad.abs().sum() > 0


def test_drop_path_only_in_the_student():
    overrides = dict(TINY, drop_path_rate=0.4, drop_path_uniform=True)
    m = DINOv2(tiny_cfg(), ModelConfig(arch="vit_tiny_patch14", spec="paper", overrides=overrides), total_steps=10)
    assert all(b.drop_path.p == 0.4 for b in m.student.backbone.blocks)
    assert all(b.drop_path.p == 0.0 for b in m.teacher.backbone.blocks)


def test_accounting_hooks():
    m = tiny_method(spec="none")
    # 2 globals of 16 patches + 2 locals of 4 patches, each with CLS + 1 register
    assert m.tokens_per_sample() == 2 * (16 + 2) + 2 * (4 + 2)
    assert m.train_flops_per_sample() > 0
    assert m.sharded_modules() == [m.student.backbone, m.teacher.backbone]
