"""Batched photometrics (and Mixup/CutMix) on the training device: the collate leaves uint8
images, the method augments them after the batch reached its device (``method.photometric``)."""
import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import make_shards
from lspretrain.data import DINOv2Collate, DINOv2MultiCrop, SupervisedCollate, ThreeAugment
from lspretrain.data.photometric import IMAGENET_MEAN, IMAGENET_STD, photometric_on_device
from lspretrain.engine.config import ModelConfig, load_config
from lspretrain.engine.metrics import read_metrics
from lspretrain.methods.classification import Classification, ClassificationConfig
from lspretrain.methods.dinov2 import DINOv2, DINOv2Config

LO = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
HI = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
TINY = dict(embed_dim=48, depth=2, num_heads=3, img_size=32, patch_size=8)


def _images(n, size=40):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_where_the_photometrics_run():
    assert photometric_on_device("device", "cpu") and not photometric_on_device("loader", "cuda")
    assert photometric_on_device("auto", "cuda") and not photometric_on_device("auto", "cpu")
    assert photometric_on_device("auto", "auto") == torch.cuda.is_available()
    with pytest.raises(ValueError, match="photometric='gpu'"):
        photometric_on_device("gpu", "cuda")


def test_dinov2_uint8_batch_is_augmented_by_the_method():
    torch.manual_seed(0)
    cfg = DINOv2Config(head_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16, global_crop_size=32,
                       local_crop_size=16, n_local_crops=2, freeze_last_layer_steps=0)
    method = DINOv2(cfg, ModelConfig(arch="vit_tiny_patch14", spec="paper", overrides=TINY), total_steps=10)
    crops = DINOv2MultiCrop(global_size=32, local_size=16, n_local=2)
    samples = [{"image": crops(im), "label": i, "key": str(i)} for i, im in enumerate(_images(4))]
    raw = DINOv2Collate(patch_size=8, global_size=32, photometric=None)(samples)
    assert raw["global_crops"].dtype == torch.uint8 and raw["local_crops"].dtype == torch.uint8
    torch.manual_seed(1)
    done = method._device_photometrics(raw)
    for key, shape in (("global_crops", (8, 3, 32, 32)), ("local_crops", (8, 3, 16, 16))):
        x = done[key]
        assert x.shape == shape and x.dtype == torch.float32 and LO - 1e-5 <= x.min() and x.max() <= HI + 1e-5
    torch.manual_seed(1)
    torch.testing.assert_close(method._device_photometrics(raw)["global_crops"], done["global_crops"], rtol=0, atol=0)
    # the first global view is always blurred (p 1.0): no output equals the plain normalised crop
    plain = (raw["global_crops"][:4].float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert not torch.allclose(done["global_crops"][:4], plain, atol=1e-3)
    loss, metrics = method(raw, step=0)  # forward takes the uint8 batch itself
    assert torch.isfinite(loss) and all(v.device == loss.device for v in metrics.values())


def test_classification_uint8_batch_gets_photometrics_and_mixup_from_the_method():
    torch.manual_seed(0)
    cfg = ClassificationConfig(num_classes=5, loss="bce", augment="three_augment", mixup_alpha=0.8, cutmix_alpha=1.0)
    method = Classification(cfg, ModelConfig(arch="vit_tiny_patch16", spec="paper", overrides=dict(TINY, patch_size=16, layerscale_init=1e-4)))
    t = ThreeAugment(size=32)
    raw = SupervisedCollate()([{"image": t(im), "label": i % 5, "key": str(i)} for i, im in enumerate(_images(6))])
    assert raw["images"].dtype == torch.uint8 and "targets" not in raw
    done = method._device_augment(raw)
    assert done["images"].dtype == torch.float32 and done["images"].shape == (6, 3, 32, 32)
    assert done["targets"].shape == (6, 5) and set(done["targets"].unique().tolist()) <= {0.0, 1.0}
    assert bool((done["targets"][torch.arange(6), raw["labels"]] == 1).all())  # binarized: own class always a target
    loss, metrics = method(raw, step=0)
    assert torch.isfinite(loss) and metrics["acc1"].device == loss.device


def test_trainer_with_photometrics_on_the_device(tmp_path):
    """The DINOv2 trainer end to end with ``method.photometric: device`` (uint8 out of the loader)."""
    from lspretrain.train import build

    spec = make_shards(str(tmp_path / "shards"), 16, 16, size=40, encode="jpeg")
    recipe = {
        "run": {"dir": str(tmp_path / "run"), "total_steps": 2},
        "model": {"arch": "vit_tiny_patch14", "spec": "paper", "overrides": TINY},
        "method": {"name": "dinov2", "head_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16,
                   "global_crop_size": 32, "local_crop_size": 16, "n_local_crops": 2, "photometric": "device"},
        "optim": {"lr": 1e-3},
        "strategy": {"name": "single", "precision": "fp32"},
        "checkpoint": {"every": 0, "save_final": False},
        "log": {"every": 1, "tensorboard": False},
        "data": {"shards": spec, "mode": "resampled", "batch_size": 4, "num_workers": 0, "require_label": False},
    }
    trainer, _ = build(load_config(recipe))
    batch = next(iter(trainer.loader))
    assert batch["global_crops"].dtype == torch.uint8  # the collate left them to the method
    trainer.fit()
    losses = read_metrics(tmp_path / "run" / "metrics.jsonl")["train/loss"][1]
    assert len(losses) == 2 and all(np.isfinite(losses))
