"""The DeiT-III supervised recipe: binarized BCE targets through the method, repeated views on a
stream, the 192 -> 224 px resolution change, learning on real Fashion-MNIST shards with 1 and 2
ranks (top-1 read back from TensorBoard / the step log), exact resume under ddp, fsdp2 and
DeepSpeed. The LAMB update against a hand computation is in test_optim.py."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from data_fixtures import make_shards
from engine_helpers import ROOT, read_merged, run_worker, spawn, tiny_recipe
from lspretrain.engine.config import ConfigError, ModelConfig, load_config
from lspretrain.methods.classification import Classification, ClassificationConfig, RepeatedCollate, RepeatedViews

TINY_RECIPE = ROOT / "recipes" / "deit3" / "tiny_fashion_mnist.yaml"


def tiny_model(img_size: int = 24, spec: str = "paper") -> dict:
    return {"arch": "vit_tiny_patch16", "spec": spec,
            "overrides": {"img_size": img_size, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
                          "layerscale_init": 0.1, "pos_embed_cls": False}}


def classifier(img_size: int = 24, **cfg) -> Classification:
    return Classification(ClassificationConfig(num_classes=10, **cfg), ModelConfig(**tiny_model(img_size)))


# -- losses and targets ---------------------------------------------------------------------
def test_bce_loss_on_mixed_batch_has_both_classes_of_each_pair_as_positives():
    np.random.seed(3)
    method = classifier(loss="bce", mixup_alpha=0.8, cutmix_alpha=1.0)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    images, targets = method.mixup()(torch.randn(6, 3, 24, 24), labels)
    for i in range(6):  # the partner of image i is image 5 - i, whatever lambda
        expected = torch.zeros(10)
        expected[[int(labels[i]), int(labels[5 - i])]] = 1.0
        assert torch.equal(targets[i], expected), i
    logits = torch.randn(6, 10)
    loss, metrics = method.compute_losses(None, logits, {"images": images, "labels": labels, "targets": targets}, 0)
    assert loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, targets).item())
    # no mixup: one-hot BCE over every class
    loss, _ = method.compute_losses(None, logits, {"images": images, "labels": labels}, 0)
    assert loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, 10).float()).item())


def test_fine_tune_cross_entropy_uses_smoothed_soft_mixup_targets():
    np.random.seed(0)
    method = classifier(loss="ce", label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0)
    labels = torch.tensor([0, 1, 2, 3])
    _, targets = method.mixup()(torch.randn(4, 3, 24, 24), labels)
    assert torch.allclose(targets.sum(-1), torch.ones(4)) and targets.min() == pytest.approx(0.01)
    logits = torch.randn(4, 10)
    loss, _ = method.compute_losses(None, logits, {"labels": labels, "targets": targets}, 0)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    loss, _ = method.compute_losses(None, logits, {"labels": labels}, 0)  # no mixup: smoothing applies here
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item(), rel=1e-6)


def test_bad_classification_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="label_smoothing"):
        ClassificationConfig(loss="bce", label_smoothing=0.1)  # binarized: every class would be 1
    with pytest.raises(ValueError, match="repeats"):
        ClassificationConfig(repeats=0)
    with pytest.raises(ValueError, match="init_head"):
        ClassificationConfig(init_head=True)
    with pytest.raises(ConfigError, match="mixup_alpha"):
        load_config(TINY_RECIPE, ["method.mixup_alfa=0.5"])


def test_repeated_views_are_adjacent_and_cut_to_the_batch_size():
    calls = iter(range(100))
    views = RepeatedViews(lambda image: torch.full((1,), float(next(calls))), repeats=3)
    samples = [{"image": views(None), "label": label, "key": f"k{label}"} for label in (7, 8)]
    batch = RepeatedCollate(lambda s: {"images": torch.stack([x["image"] for x in s]),
                                       "labels": torch.tensor([x["label"] for x in s])}, batch_size=5)(samples)
    assert batch["labels"].tolist() == [7, 7, 7, 8, 8]  # 5 is not a multiple of 3: the last image gives 2
    assert batch["images"].flatten().tolist() == [0, 1, 2, 3, 4]  # every view its own augmentation


# -- resolution change ------------------------------------------------------------------------
def test_fine_tune_at_a_higher_resolution_starts_from_the_pretrained_model(tmp_path):
    from lspretrain.convert import read_source
    from lspretrain.models.vit import resample_pos_embed

    pre_dir = tmp_path / "pre"
    recipe = tiny_recipe(pre_dir, steps=4, model=tiny_model(24), synthetic={"img_size": 24})
    assert run_worker(recipe)["status"] == "completed"
    pos = read_source(str(pre_dir), None).state_dict["pos_embed"]
    assert pos.shape == (1, 36, 32)  # patches only (DeiT-III): 6 x 6 at 24 px
    assert torch.equal(resample_pos_embed(pos, (6, 6), has_cls=False), pos)  # at the source grid: itself

    torch.manual_seed(1)
    source = classifier(24, init_from=str(pre_dir), init_head=True).eval()
    tuned = classifier(32, init_from=str(pre_dir), init_head=True).eval()
    torch.testing.assert_close(tuned.backbone.pos_embed.detach(), resample_pos_embed(pos, (8, 8), has_cls=False))
    same = {n: p for n, p in source.named_parameters() if n != "backbone.pos_embed"}
    for name, p in tuned.named_parameters():
        if name != "backbone.pos_embed":
            assert torch.equal(p, same[name]), name  # every other weight, head included, is the checkpoint's
    x = torch.randn(8, 3, 24, 24)
    with torch.no_grad():
        want, got = source.head(source.backbone(x)), tuned.head(tuned.backbone(x))
    # At 24 px the tuned model resamples its 8x8 grid back to 6x6: bicubic up then down is not
    # exact, but a misplaced or transposed grid would change the logits far more.
    assert (got - want).abs().max() < 0.05 * want.abs().max()

    fresh = classifier(32, init_from=str(pre_dir), init_head=False)
    assert not torch.equal(fresh.head.weight, tuned.head.weight)  # head replaced, backbone kept
    assert torch.equal(fresh.backbone.blocks[0].attn.qkv.weight, tuned.backbone.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="init_head=false"):
        Classification(ClassificationConfig(num_classes=5, init_from=str(pre_dir), init_head=True),
                       ModelConfig(**tiny_model(32)))
    with pytest.raises(ValueError, match="does not fit"):
        Classification(ClassificationConfig(num_classes=10, init_from=str(pre_dir)),
                       ModelConfig(**tiny_model(32, spec="none")))  # a specialized checkpoint into a plain ViT


# -- learning on real images ------------------------------------------------------------------
@pytest.fixture(scope="module")
def fashion_mnist(tmp_path_factory):
    """6,000 training and 1,000 test images of Debian's Fashion-MNIST as PNG shards."""
    from lspretrain.data.shard_writer import (FASHION_MNIST_CLASSES, EncodeOptions, find_fashion_mnist, idx_items,
                                              index_path, write_shards)

    folder = find_fashion_mnist(None)
    if folder is None:
        pytest.fail("Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
    out = str(tmp_path_factory.mktemp("fashion_mnist"))
    indexes = {}
    for split, stem, n in (("train", "train", 6000), ("test", "t10k", 1000)):
        items = idx_items(f"{folder}/{stem}-images-idx3-ubyte.gz", f"{folder}/{stem}-labels-idx1-ubyte.gz")[:n]
        write_shards(items, out, split, FASHION_MNIST_CLASSES, max_count=1000, shuffle_seed=0,
                     options=EncodeOptions(encode="png"), num_workers=2)
        indexes[split] = index_path(out, split)
    return indexes


def tiny_fashion_mnist_recipe(run_dir, indexes, steps: int, **sections) -> dict:
    """recipes/deit3/tiny_fashion_mnist.yaml on the test's shards and a shorter budget."""
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    recipe["run"].update(dir=str(run_dir), total_steps=steps)
    recipe["data"].update(index=indexes["train"])
    recipe["eval"].update(index=indexes["test"], every=steps, max_samples=1000)
    recipe["checkpoint"].update(every=0)
    # Cheap enough to pass with a 4x margin on a loaded 2-core machine: many small steps (steps
    # teach this model more than batch size does), the recipe's lr unscaled, no Mixup/CutMix
    # (its regularization needs more steps than a test has), fp32 (the same numbers on every
    # CPU, native bf16 or not). The recipe's own budget and figures are in BENCHMARKS.md; the
    # resume tests exercise Mixup/CutMix.
    recipe["optim"].update(warmup_steps=15, lr_scaling="none")
    recipe["method"].update(mixup_prob=0.0)
    recipe["data"].update(batch_size=LEARN_BATCH)
    recipe["strategy"].update(precision="fp32")
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    return recipe


LEARN_STEPS, LEARN_BATCH = 400, 24
CHANCE = 10.0


def test_tiny_recipe_learns_fashion_mnist_on_one_rank(tmp_path, fashion_mnist):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lspretrain.train import run

    torch.set_num_threads(2)
    assert run(load_config(tiny_fashion_mnist_recipe(tmp_path, fashion_mnist, LEARN_STEPS))) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "completed" and result["step"] == LEARN_STEPS
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"eval/top1", "eval/top5", "train/loss_cls", "perf/images_per_s", "data/epoch"} <= tags
    (top1,) = [e.value for e in events.Scalars("eval/top1")]
    (top5,) = [e.value for e in events.Scalars("eval/top5")]
    # BCE, 3-Augment, 2 repeats, LAMB: 31.1 % here, top-5 90.6 % (10 % chance; top-5 50 %)
    assert top1 > 2.5 * CHANCE and top5 > 80.0
    assert events.Scalars("data/epoch")[-1].value == 0  # 400 steps x 24 samples = 4,800 images x 2 repeats < 6,000


def test_tiny_recipe_learns_fashion_mnist_on_two_ranks(tmp_path, fashion_mnist):
    recipe = tiny_fashion_mnist_recipe(tmp_path, fashion_mnist, LEARN_STEPS, strategy={"name": "ddp", "precision": "fp32"},
                                       data={"batch_size": LEARN_BATCH // 2, "num_workers": 0})  # the same global batch
    result = spawn(2, recipe)
    assert result["status"] == "completed" and result["world_size"] == 2
    final = read_merged(tmp_path)[LEARN_STEPS]
    assert final["eval/top1"] > 2.5 * CHANCE and final["eval/top5"] > 80.0


# -- exact resume -----------------------------------------------------------------------------
RESUME_STEPS = 8


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    return make_shards(str(tmp_path_factory.mktemp("shards")), n=24, per_shard=6, size=20)


def deit_recipe(run_dir, shards, strategy: dict) -> dict:
    """Every moving part: 3-Augment, 2 repeats, BCE on binarized Mixup/CutMix, drop path, LAMB, model EMA,
    epoch mode (12 images per rank = 6 steps per epoch: the resumed run crosses an epoch)."""
    model = tiny_model(16)
    model["overrides"]["drop_path_rate"] = 0.2  # in-model randomness: its RNG must resume too
    recipe = tiny_recipe(run_dir, steps=RESUME_STEPS, strategy=strategy, model=model)
    recipe.update({
        "method": {"name": "classification", "num_classes": 10, "loss": "bce", "augment": "three_augment",
                   "rrc_scale": [0.35, 1.0], "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "repeats": 2,
                   "ema_momentum": 0.9},
        "optim": {"name": "lamb", "lr": 5e-3, "warmup_steps": 2, "weight_decay": 0.05, "clip_grad": 1.0},
        "data_source": "webdataset",
        "data": {"shards": shards, "mode": "epoch", "batch_size": 4, "num_workers": 1, "shuffle_window": 4},
        "eval": {"every": RESUME_STEPS, "shards": shards, "max_samples": 24, "batch_size": 12},
    })
    return recipe


@pytest.mark.parametrize("strategy", [{"name": "ddp", "precision": "fp32"},
                                      {"name": "fsdp2", "precision": "fp32"},
                                      {"name": "deepspeed", "precision": "fp32", "deepspeed": {"stage": 1}}],
                         ids=["ddp", "fsdp2", "deepspeed-zero1"])
def test_deit3_two_ranks_resume_exactly(tmp_path, small_shards, strategy):
    full = spawn(2, deit_recipe(tmp_path / "full", small_shards, strategy))
    assert full["status"] == "completed" and full["step"] == RESUME_STEPS
    stopped = spawn(2, deit_recipe(tmp_path / "resumed", small_shards, strategy), signal_at=3)
    assert stopped["status"] == "preempted" and stopped["step"] == 4
    resumed = spawn(2, deit_recipe(tmp_path / "resumed", small_shards, strategy))
    assert resumed["status"] == "completed" and resumed["step"] == RESUME_STEPS
    want, got = read_merged(tmp_path / "full"), read_merged(tmp_path / "resumed")
    for step in range(1, RESUME_STEPS + 1):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-6, abs=1e-7), step
    for key in ("eval/top1", "eval/top5", "eval/ema_top1", "eval/ema_top5"):
        assert got[RESUME_STEPS][key] == pytest.approx(want[RESUME_STEPS][key]), key
    assert want[RESUME_STEPS]["loss"] != want[1]["loss"]


# -- recipes ----------------------------------------------------------------------------------
def test_deit3_recipes_load_and_count_as_stated():
    from lspretrain.models import build_backbone

    shards = ["data.shards=/data/in1k/train-{000000..001023}.tar",  # recipes leave the data to the command line
              "eval.shards=/data/in1k/val-{000000..000063}.tar"]
    needs = {"vitl16_ft224.yaml": ["method.init_from=runs/pretrained"]}
    counts = {}
    for path in sorted((ROOT / "recipes" / "deit3").glob("*.yaml")):
        cfg = load_config(path, shards + needs.get(path.name, []))
        assert cfg.method.name == "classification" and cfg.model.overrides["pos_embed_cls"] is False, path.name
        assert cfg.model.overrides["layerscale_init"] == 1e-4, path.name
        with torch.device("meta"):
            model = build_backbone(cfg.model.arch, cfg.model.spec, **cfg.model.overrides)
        counts[path.stem] = sum(p.numel() for p in model.parameters())
    assert set(counts) >= {"vitl16_800ep_baseline", "vitl16_800ep_paper", "vitl16_ft224", "vits16_800ep_paper",
                           "vitb16_800ep_paper", "tiny_fashion_mnist"}
    base, paper = (load_config(ROOT / f"recipes/deit3/vitl16_800ep_{name}.yaml", shards) for name in ("baseline", "paper"))
    # timm's ViT-L/16 at 224 px without head (303,301,632), plus LayerScale (24 x 2 x 1024), with
    # 144 patch-only positions instead of 197; the paper's specialization adds 25.34 M
    assert counts["vitl16_800ep_baseline"] == 303_301_632 + 24 * 2 * 1024 - (197 - 144) * 1024
    assert counts["vitl16_800ep_paper"] - counts["vitl16_800ep_baseline"] == 25_339_904
    assert counts["vitl16_ft224"] - counts["vitl16_800ep_baseline"] == 1024 * (196 - 144)  # only pos_embed grows
    # the two pretraining recipes differ only in the specialization
    a, b = copy.deepcopy(base), copy.deepcopy(paper)
    a.model.spec = b.model.spec = "x"
    a.run.dir = b.run.dir = "x"
    assert a == b
    assert base.run.total_steps == -(-1_281_167 * 800 // 2048) and base.optim.name == "lamb" and base.method.repeats == 3
