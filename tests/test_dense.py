"""Dense linear probe: the mIoU arithmetic by hand, a probe that must reach 100 % on linearly
separable features, the segmentation source of the shard writer with its bad pairs, the
Fashion-MNIST mosaics, a real small probe above chance, and the command-line tool."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lspretrain.data.shard_writer import IGNORE_INDEX, Item, MaskOptions, find_fashion_mnist, write_shards
from lspretrain.data.shards import ShardIndex
from lspretrain.eval.dense import (DenseEvalConfig, DenseProbe, confusion_matrix, evaluate_dense,
                                   segmentation_metrics, window_starts)

ROOT = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.skipif(find_fashion_mnist(None) is None,
                                  reason="Fashion-MNIST IDX files absent (apt-get install dataset-fashion-mnist)")


# ---------------------------------------------------------------------------- arithmetic
def test_confusion_and_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 1],
                           [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 1, 2]])  # the two ignored pixels' predictions must not count
    conf = confusion_matrix(pred, target, num_classes=4, ignore_index=255)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    m = segmentation_metrics(conf, ["road", "car/truck", "sky", "absent"])
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 2, FP 1, FN 0 -> 2/3; class 2: TP 1, FN 1 -> 1/2;
    # class 3 neither in the truth nor predicted: no IoU, not in the mean.
    assert m["iou/road"] == pytest.approx(100 / 3) and m["iou/car_truck"] == pytest.approx(200 / 3)
    assert m["iou/sky"] == pytest.approx(50.0) and "iou/absent" not in m
    assert m["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["pixel_acc"] == pytest.approx(100 * 4 / 6)  # 6 labelled pixels, 4 right
    with pytest.raises(ValueError, match="label 7 outside the 4 classes"):
        confusion_matrix(pred, torch.full_like(target, 7), num_classes=4)


def test_window_starts_cover_the_image_last_flush():
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(683, 512, 341) == [0, 171]  # mmseg: the last window ends at the border
    assert window_starts(24, 8, 5) == [0, 5, 10, 15, 16]
    assert window_starts(5, 8, 5) == [0]  # smaller than a window: padded


# ---------------------------------------------------------------------------- separable features
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)  # class -> colour


def _blocks(rng, h_patches, w_patches, p=4, ignore_patches=1):
    """An image of vertical colour stripes one patch wide, its class mask, a block marked ignore.

    Stripes, not a checkerboard: logits upsampled bilinearly from the patch grid blend a pixel's
    patch with its neighbours (weight 5/8 on its own, 4x), and at a corner surrounded by another
    class no linear head can win; along a straight border it can, and must."""
    classes = rng.integers(0, 3, (1, w_patches)).repeat(h_patches, 0)
    image = PALETTE[classes].repeat(p, 0).repeat(p, 1)
    mask = classes.astype(np.uint8).repeat(p, 0).repeat(p, 1)
    for _ in range(ignore_patches):
        i, j = rng.integers(0, h_patches), rng.integers(0, w_patches)
        mask[i * p:(i + 1) * p, j * p:(j + 1) * p] = IGNORE_INDEX
    return image, mask


def _block_shards(folder, n, h_patches, w_patches, prefix, seed):
    rng = np.random.default_rng(seed)
    items = [Item(f"{prefix}{i}", -1, *_blocks(rng, h_patches, w_patches)) for i in range(n)]
    write_shards(items, str(folder), prefix, ["red", "green", "blue"], num_workers=1,
                 masks=MaskOptions(3, ignore_value=IGNORE_INDEX))
    return str(folder / f"{prefix}-index.json")


class ColourBackbone(torch.nn.Module):
    """A hand-made 'backbone': each patch's feature is its mean colour, a linearly separable
    map of the block classes (what get_intermediate_layers gives the probe)."""

    def __init__(self, patch=4, img_size=16):
        super().__init__()
        self.cfg = SimpleNamespace(patch_size=patch, img_size=img_size, embed_dim=3)
        self.blocks = [None]

    def get_intermediate_layers(self, x, n=1, reshape=True, return_class_token=True, norm=True):
        patches = F.avg_pool2d(x, self.cfg.patch_size)
        return ((patches, patches.mean(dim=(2, 3))),)


def test_probe_reaches_miou_100_on_separable_features(tmp_path):
    train = _block_shards(tmp_path, 40, 4, 4, "train", seed=0)
    val = _block_shards(tmp_path, 10, 4, 6, "val", seed=1)  # 16 x 24 px: two overlapping 16 px windows (stride 8, patch-aligned)
    cfg = DenseEvalConfig(index=train, val_index=val, epochs=30, lr=0.05, batch_size=16, stride=8, max_val_samples=10)
    metrics = evaluate_dense(ColourBackbone(), cfg)
    assert metrics == {"miou": 100.0, "pixel_acc": 100.0, "iou/red": 100.0, "iou/green": 100.0, "iou/blue": 100.0}
    # The same probe with the CLS token concatenated: as separable, same answer.
    assert evaluate_dense(ColourBackbone(), DenseEvalConfig(**{**cfg.__dict__, "use_cls": True}))["miou"] == 100.0


def test_probe_refuses_bad_settings(tmp_path):
    train = _block_shards(tmp_path, 2, 4, 4, "train", seed=0)
    with pytest.raises(ValueError, match="val_shards or val_index"):
        DenseProbe(DenseEvalConfig(index=train))
    with pytest.raises(ValueError, match="num_classes=5 but the index .* names 3 classes"):
        DenseProbe(DenseEvalConfig(index=train, val_index=train, num_classes=5))
    with pytest.raises(ValueError, match="layers=4: the backbone has only 1 blocks"):
        DenseProbe(DenseEvalConfig(index=train, val_index=train, layers=4)).evaluate(ColourBackbone())
    with pytest.raises(ValueError, match="img_size=18 is not a multiple of the patch size 4"):
        DenseProbe(DenseEvalConfig(index=train, val_index=train, img_size=18)).evaluate(ColourBackbone())


def test_masks_with_stray_labels_are_skipped_and_named(tmp_path, caplog):
    """Shards written elsewhere, with an index that names no classes: num_classes from the
    config, and a mask holding a value that is neither a class nor ignore is skipped."""
    rng = np.random.default_rng(0)
    items = [Item(f"s{i}", -1, *_blocks(rng, 4, 4)) for i in range(4)]
    items[2].mask[0, 0] = 7
    write_shards(items, str(tmp_path), "s", num_workers=1, masks=MaskOptions(8, ignore_value=IGNORE_INDEX))
    idx = ShardIndex.load(str(tmp_path / "s-index.json"))
    ShardIndex(idx.shards).save(str(tmp_path / "bare-index.json"))  # as `make_shards.py index` writes it
    bare = str(tmp_path / "bare-index.json")
    with pytest.raises(ValueError, match="names no classes; set num_classes"):
        DenseProbe(DenseEvalConfig(index=bare, val_index=bare))
    probe = DenseProbe(DenseEvalConfig(index=bare, val_index=bare, num_classes=3))
    assert len(probe.train_images) == 3 and probe.class_names == ["0", "1", "2"]
    assert "s-000000.tar:000000002: mask holds label 7, neither one of the 3 classes nor ignore_index 255" in caplog.text


# ---------------------------------------------------------------------------- segmentation source
def _members(path):
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t}


def test_segmentation_source_pairs_remaps_and_lists_bad_pairs(tmp_path):
    """ADE20K layout through tools/make_shards.py: 0 = ignore, classes from 1; a missing mask,
    a size mismatch, a label above --num-classes, an RGB mask and a mask without an image are
    skipped and listed."""
    root = tmp_path / "ADEChallengeData2016"
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def pair(name, mask, size=(10, 8), mode="L"):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / "images" / "validation" / f"{name}.jpg")
        if mask is not None:
            Image.fromarray(mask, mode).save(root / "annotations" / "validation" / f"{name}.png")

    good = np.zeros((8, 10), np.uint8)
    good[:4] = 1
    good[4:, :5] = 150
    pair("a_good", good)
    pair("b_nomask", None)
    pair("c_size", np.ones((9, 10), np.uint8))
    pair("d_label", np.full((8, 10), 151, np.uint8))
    pair("e_rgb", np.ones((8, 10, 3), np.uint8), mode="RGB")
    Image.fromarray(good).save(root / "annotations" / "validation" / "f_orphan.png")
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "segmentation", str(out), "--ade20k",
                        str(root), "--split", "validation", "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 samples, 1 shards, 5 skipped" in r.stdout
    idx = ShardIndex.load(str(out / "ade20k-validation-index.json"))
    reasons = {Path(s["path"]).stem: s["reason"] for s in idx.skipped}
    assert sorted(reasons) == ["b_nomask", "c_size", "d_label", "e_rgb", "f_orphan"]
    assert "missing mask" in reasons["b_nomask"] and "mask is 10x9 but the image is 10x8" in reasons["c_size"]
    assert "label 151, above the 150 classes" in reasons["d_label"] and "mode RGB" in reasons["e_rgb"]
    assert "no image for this mask" in reasons["f_orphan"]
    assert len(idx.classes) == 150 and idx.classes[0] == "1"  # named by ADE20K's own numbering
    members = _members(out / "ade20k-validation-000000.tar")
    assert sorted(members) == ["000000000.jpg", "000000000.json", "000000000.seg.png"]  # no .cls: no image label
    mask = np.asarray(Image.open(io.BytesIO(members["000000000.seg.png"])))
    expected = np.full((8, 10), IGNORE_INDEX, np.uint8)  # 0 -> ignore, v -> v - 1
    expected[:4] = 0
    expected[4:, :5] = 149
    assert mask.tolist() == expected.tolist()
    # Missing arguments and a bad folder: a message, no traceback.
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "segmentation", str(out),
                          "--images", str(tmp_path / "nope"), "--masks", str(tmp_path), "--num-classes", "3"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "nope is not a directory" in bad.stderr


def test_masks_follow_a_resize_nearest(tmp_path):
    from lspretrain.data.shard_writer import EncodeOptions

    mask = np.zeros((8, 12), np.uint8)
    mask[:, 6:] = 2
    item = Item("x", -1, np.zeros((8, 12, 3), np.uint8), mask)
    write_shards([item], str(tmp_path), "r", num_workers=1, options=EncodeOptions(encode="png", resize=4),
                 masks=MaskOptions(3))
    members = _members(tmp_path / "r-000000.tar")
    got = np.asarray(Image.open(io.BytesIO(members["000000000.seg.png"])))
    assert got.shape == (4, 6) and set(np.unique(got)) == {0, 2}  # class ids, never blended
    assert ShardIndex.load(str(tmp_path / "r-index.json")).classes == ["0", "1", "2"]


# ---------------------------------------------------------------------------- mosaics
@needs_fmnist
def test_mosaics_are_deterministic_and_masks_come_from_the_pixels(tmp_path):
    from lspretrain.data.mosaic import BACKGROUND_THRESHOLD, ITEM_THRESHOLD, MOSAIC_CLASSES, fashion_mnist_mosaic_shards, make_mosaics
    from lspretrain.data.shard_writer import read_idx

    folder = find_fashion_mnist(None)
    images = read_idx(f"{folder}/t10k-images-idx3-ubyte.gz")[:500]
    labels = read_idx(f"{folder}/t10k-labels-idx1-ubyte.gz")[:500]
    a, ma = make_mosaics(images, labels, 20, 3, seed=7)
    b, mb = make_mosaics(images, labels, 20, 3, seed=7)
    c, _ = make_mosaics(images, labels, 20, 3, seed=8)
    assert a.shape == ma.shape == (20, 84, 84) and np.array_equal(a, b) and np.array_equal(ma, mb)
    assert not np.array_equal(a, c)
    # Every cell is a real item, and its mask is that item's pixels thresholded with its class.
    for cell in range(9):
        r, q = divmod(cell, 3)
        pix, msk = a[0, 28 * r:28 * r + 28, 28 * q:28 * q + 28], ma[0, 28 * r:28 * r + 28, 28 * q:28 * q + 28]
        item = int(np.flatnonzero((images == pix).all(axis=(1, 2)))[0])
        assert (msk[pix >= ITEM_THRESHOLD] == 1 + labels[item]).all() and (msk[pix < BACKGROUND_THRESHOLD] == 0).all()
        assert (msk[(pix >= BACKGROUND_THRESHOLD) & (pix < ITEM_THRESHOLD)] == IGNORE_INDEX).all()
    # The shards: byte-identical when rebuilt elsewhere, the 11 classes named in the index.
    p1 = fashion_mnist_mosaic_shards(str(tmp_path / "one"), "test", k=2, count=30, num_workers=1)
    p2 = fashion_mnist_mosaic_shards(str(tmp_path / "two"), "test", k=2, count=30, num_workers=1)
    t1, t2 = (Path(p).with_name("fashion-mnist-mosaic2-test-000000.tar").read_bytes() for p in (p1, p2))
    assert t1 == t2 and ShardIndex.load(p1).classes == MOSAIC_CLASSES and len(MOSAIC_CLASSES) == 11


def _tiny_vit(spec="none", seed=0):
    from lspretrain.models import build_backbone

    torch.manual_seed(seed)
    return build_backbone("vit_tiny_patch14", spec, img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                          layerscale_init=0.1).eval()


@pytest.fixture(scope="module")
def mosaic_indexes(tmp_path_factory):
    from lspretrain.data.mosaic import fashion_mnist_mosaic_shards

    folder = str(tmp_path_factory.mktemp("mosaic"))
    return (fashion_mnist_mosaic_shards(folder, "train", k=2, count=120, num_workers=1),
            fashion_mnist_mosaic_shards(folder, "test", k=2, count=40, num_workers=1))


@needs_fmnist
def test_small_probe_on_mosaics_learns_above_chance(mosaic_indexes):
    """A random tiny ViT's patch tokens still carry the pixels' brightness (not yet which garment
    they belong to): the probe must separate items from background far better than the best
    constant answer (everything background), and so beat its mIoU."""
    train, val = mosaic_indexes
    cfg = DenseEvalConfig(index=train, val_index=val, resize=56, epochs=4, lr=1e-2, max_samples=120, max_val_samples=40)
    metrics = evaluate_dense(_tiny_vit(), cfg)
    probe = DenseProbe(cfg)
    masks = np.concatenate([m[m != IGNORE_INDEX] for _, _, m in probe.val_images])
    background = float((masks == 0).mean())
    constant_miou = 100 * background / len(np.unique(masks))  # IoU_bg = share of background; other classes 0
    assert metrics["iou/background"] > 100 * background + 15, (metrics, background)  # constant: IoU = share
    assert metrics["miou"] > 1.5 * constant_miou and metrics["pixel_acc"] > 100 * background


@needs_fmnist
def test_dinov2_import_plain_and_specialized_give_the_same_miou(tmp_path, mosaic_indexes):
    """--from dinov2 weights through tools/eval_dense.py, plain and with --spec paper (CLS copies
    equal the shared weights at conversion): the same mIoU, table and JSON written."""
    from lspretrain.convert import Backbone, write

    write(Backbone.from_model(_tiny_vit(seed=3)), "dinov2", tmp_path / "d.pth")
    train, val = mosaic_indexes
    results = []
    for extra in ([], ["--spec", "paper"]):
        out = tmp_path / f"r{len(extra)}.json"
        r = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_dense.py"), str(tmp_path / "d.pth"), "--from", "dinov2",
                            *extra, "--train", train, "--val", val, "--resize", "56", "--epochs", "2", "--max-samples",
                            "60", "--max-val-samples", "20", "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert ("(specialized)" if extra else "(plain)") in r.stderr and "dense probe: mIoU" in r.stderr
        assert "mIoU" in r.stdout and "Ankle_boot" in r.stdout and "pixel accuracy" in r.stdout
        results.append(json.loads(out.read_text()))
    plain, special = (r["metrics"] for r in results)
    # Exactly: on the CPU the routed layers give bit-identical patch tokens while CLS copies equal the shared weights.
    assert plain == special and plain["miou"] > 0
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_dense.py"), str(tmp_path / "nothing"),
                          "--train", train, "--val", val], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nothing" in bad.stderr
