"""Augmentations, masks, mixup: shapes, ranges, probabilities, mask ratios; end to end in the loader."""
from __future__ import annotations

import io
import random
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import make_shards
from lspretrain.data import DataConfig, build_loader
from lspretrain.data.augment import DINOv2MultiCrop, EvalTransform, SimpleRandomCrop, ThreeAugment
from lspretrain.data.collate import DINOv2Collate, SupervisedCollate
from lspretrain.data.masking import MaskingGenerator
from lspretrain.data.mixup import MixupCutmix
from lspretrain.data.photometric import IMAGENET_MEAN, IMAGENET_STD, ThreeAugmentPhotometric, color_transform, solarize

LO = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
HI = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))


def _img(w=50, h=40, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_dinov2_multicrop_and_collate_shapes_ranges_masks():
    torch.manual_seed(0)
    random.seed(0)
    mc = DINOv2MultiCrop(global_size=28, local_size=12, n_local=3)
    samples = [{"image": mc(_img(seed=i)), "label": i, "key": str(i)} for i in range(8)]
    assert samples[0]["image"]["global"].shape == (2, 3, 28, 28) and samples[0]["image"]["global"].dtype == torch.uint8
    batch = DINOv2Collate(patch_size=4, global_size=28, photometric=mc.photometric)(samples)
    assert batch["global_crops"].shape == (16, 3, 28, 28) and batch["local_crops"].shape == (24, 3, 12, 12)
    for k in ("global_crops", "local_crops"):
        x = batch[k]
        assert x.dtype == torch.float32 and LO - 1e-5 <= x.min() and x.max() <= HI + 1e-5
    m = batch["masks"]
    assert m.shape == (16, 49) and m.dtype == torch.bool
    masked_rows = m.any(1)
    assert int(masked_rows.sum()) == 8  # 50 % of the 2B global crops
    assert torch.equal(m.flatten().nonzero().flatten(), batch["mask_indices"])
    assert (m.sum(1) <= int(49 * 0.5)).all()  # no crop above the top mask ratio
    assert torch.equal(batch["labels"], torch.arange(8))


def test_mask_ratios_spread_over_range():
    random.seed(1)
    col = DINOv2Collate(patch_size=14, global_size=224)  # 16x16 patches, as dinov2
    ratios = []
    for _ in range(20):
        m = col.masks(64)["masks"]
        r = m.float().mean(1)
        ratios += r[r > 0].tolist()
        assert int((r > 0).sum()) == 32
    ratios = np.array(ratios)
    assert ratios.max() <= 0.5 + 1e-9 and ratios.min() >= 0.1 - 1 / 256 - 0.05
    # Targets are one per sub-interval of [0.1, 0.5]: the mean masked ratio is about 0.3.
    assert 0.25 < ratios.mean() <= 0.3 + 0.01
    assert np.quantile(ratios, 0.1) < 0.18 and np.quantile(ratios, 0.9) > 0.42


def test_masking_generator_blocks_never_exceed_target():
    random.seed(2)
    gen = MaskingGenerator((16, 16), max_num_patches=128)
    for target in (0, 10, 50, 128):
        m = gen(target)
        assert m.sum() <= target and (target == 0 or m.sum() >= 0.8 * target)


def test_color_transform_is_affine_per_image():
    x = torch.rand(6, 3, 8, 8)
    torch.manual_seed(0)
    g = color_transform(x.clone(), (0, 0, 0, 0), 0.0, 1.0)  # grayscale only
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    assert torch.allclose(g[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2], atol=1e-6)
    same = color_transform(x.clone(), (0.4, 0.4, 0.2, 0.1), 0.0, 0.0)  # p = 0: identity
    assert torch.allclose(same, x, atol=1e-5)
    hue0 = color_transform(x.clone() * 0 + 0.5, (0, 0, 0, 0.5), 1.0, 0.0)  # grey is hue-invariant
    assert torch.allclose(hue0, torch.full_like(x, 0.5), atol=1e-5)
    torch.manual_seed(3)
    j = color_transform(x.clone(), (0.4, 0.4, 0.2, 0.1), 1.0, 0.0)
    assert j.min() >= 0 and j.max() <= 1 and not torch.allclose(j, x)


def test_three_augment_applies_exactly_one_of_gray_solarize_blur():
    torch.manual_seed(0)
    x = torch.rand(30, 3, 16, 16)
    out = ThreeAugmentPhotometric(jitter=0.0)(x.clone())
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = out * std + mean
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1).expand(-1, 3, -1, -1)
    kinds = []
    for i in range(30):
        is_gray = torch.allclose(out[i], gray[i], atol=1e-5)
        is_sol = torch.allclose(out[i], solarize(x[i]), atol=1e-5)
        is_blur = not is_gray and not is_sol and out[i].diff(dim=-1).abs().mean() < x[i].diff(dim=-1).abs().mean()
        assert is_gray + is_sol + is_blur == 1
        kinds.append(0 if is_gray else 1 if is_sol else 2)
    assert set(kinds) == {0, 1, 2}


def test_supervised_transforms_shapes():
    random.seed(0)
    img = _img(60, 45)
    assert ThreeAugment(size=32)(img).shape == (3, 32, 32)
    src = SimpleRandomCrop(size=32)(img)
    assert src.shape == (3, 32, 32) and src.dtype == torch.uint8
    ev = EvalTransform(size=32)(img)
    assert ev.shape == (3, 32, 32) and ev.dtype == torch.float32
    # Eval is deterministic: resize shorter side to 36, centre crop 32.
    ref = img.resize((48, 36), Image.BICUBIC, reducing_gap=3.0).crop((8, 2, 40, 34))
    expect = (torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(ev, expect, atol=1e-5)


def test_mixup_cutmix_targets():
    np.random.seed(0)
    x = torch.rand(8, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    mix = MixupCutmix(num_classes=10, cutmix_alpha=0.0)  # mixup only
    np.random.seed(5)
    xm, t = mix(x, labels)
    np.random.seed(5)
    lam = float(np.random.beta(0.8, 0.8)) if np.random.rand() < 1.0 else 1.0
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert torch.equal(t.sum(1), torch.full((8,), 2.0))  # binarised: both classes are targets
    assert torch.equal(t[torch.arange(8), labels], torch.ones(8))
    soft = MixupCutmix(num_classes=10, binarize=False, label_smoothing=0.1, mixup_alpha=0.0)  # cutmix only
    xs, ts = soft(x, labels)
    assert torch.allclose(ts.sum(1), torch.ones(8)) and ts.min() >= 0.01 - 1e-6
    pasted = (xs != x).any(0).any(0)  # the box region comes from the partner image
    area = pasted.float().mean().item()
    assert ts[0, 0].item() == pytest.approx((1 - area) * 0.9 + 0.01, abs=1e-5)
    with pytest.raises(ValueError, match="label_smoothing"):
        MixupCutmix(num_classes=10, label_smoothing=0.1)


def test_dinov2_pipeline_in_loader_is_resumable_bit_exact(tmp_path):
    spec = make_shards(str(tmp_path), n=24, per_shard=8, size=32, encode="jpeg")
    mc = DINOv2MultiCrop(global_size=16, local_size=8, n_local=2)
    col = DINOv2Collate(patch_size=4, global_size=16, photometric=mc.photometric)
    cfg = DataConfig(shards=spec, mode="resampled", batch_size=4, num_workers=2, shuffle_window=8)
    ref = list(islice(iter(build_loader(cfg, mc, col, rank=0, world_size=1)), 5))
    assert ref[0]["global_crops"].shape == (8, 3, 16, 16) and ref[0]["local_crops"].shape == (8, 3, 8, 8)
    first = build_loader(cfg, mc, col, rank=0, world_size=1)
    list(islice(iter(first), 2))
    resumed = build_loader(cfg, mc, col, rank=0, world_size=1)
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(ref[2:], islice(iter(resumed), 3)):
        for k in ("global_crops", "local_crops", "masks", "labels"):
            assert torch.equal(a[k], b[k]), k  # same crops, colours and masks after resume


def test_supervised_pipeline_in_loader(tmp_path):
    spec = make_shards(str(tmp_path), n=12, per_shard=6, size=24, encode="jpeg")
    ta = ThreeAugment(size=16)
    col = SupervisedCollate(photometric=ta.photometric, mixup=MixupCutmix(num_classes=10))
    cfg = DataConfig(shards=spec, batch_size=4, num_workers=1, shuffle_window=4)
    batches = list(build_loader(cfg, ta, col, rank=0, world_size=1))
    assert len(batches) == 3
    b = batches[0]
    assert b["images"].shape == (4, 3, 16, 16) and b["targets"].shape == (4, 10)
    assert set(b["targets"].unique().tolist()) <= {0.0, 1.0}
    assert sorted(int(l) for x in batches for l in x["labels"]) == sorted(i % 10 for i in range(12))
