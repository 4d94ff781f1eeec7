"""Continued pretraining from released weights (``method.init_from``, lspretrain/methods/init_from.py):
at step 0 the teacher computes what the released dinov2 model computes (plain and specialized),
registers are kept, a wrong architecture is refused before any work, the heads start fresh or
from a file, a frozen backbone stays bit-identical under AdamW, and a short continued run on
Fashion-MNIST resumes exactly and exports back. DeiT-III starts from a timm state dict.

The official equivalence uses the dinov2 repository's own ``DinoVisionTransformer``: the
installed ``dinov2`` package (``pip install --no-deps dinov2``) or the checkout that
``torch.hub.load("facebookresearch/dinov2", ...)`` leaves in the hub cache; without either it is
skipped, and the other tests use the dinov2 layout as our converter writes it.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from engine_helpers import read_merged, run_worker
from lspretrain.convert import Backbone, load_backbone, read_released, read_source, write
from lspretrain.engine.config import ModelConfig, load_config
from lspretrain.methods.classification import Classification, ClassificationConfig
from lspretrain.methods.dinov2 import DINOv2, DINOv2Config
from lspretrain.models import create_vit, is_cls_param
from lspretrain.models.heads import DINOHead
from lspretrain.models.vit import resample_pos_embed

ROOT = Path(__file__).resolve().parents[1]
# The released model: 56 px, patch 7 (an 8 x 8 grid); the recipes train at 28 px (4 x 4), as a
# 518 px dinov2 release (37 x 37) is continued at 224 px (16 x 16).
RELEASED = dict(img_size=56, patch_size=7, embed_dim=48, depth=3, num_heads=3, layerscale_init=0.1, mask_token=True)
RECIPE = {**RELEASED, "img_size": 28}
HEADS = dict(head_prototypes=32, head_hidden_dim=32, head_bottleneck_dim=16)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is fastest, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def official_vit(monkeypatch, required=True):
    """dinov2's ``DinoVisionTransformer``; without it the test is skipped (or None if not ``required``)."""
    try:
        from dinov2.models.vision_transformer import DinoVisionTransformer
    except ImportError:
        hub = Path(torch.hub.get_dir()) / "facebookresearch_dinov2_main"
        if not (hub / "dinov2" / "models" / "vision_transformer.py").is_file():
            if required:
                pytest.skip("the dinov2 repository's model code is not installed (pip install --no-deps dinov2) "
                            "nor in the torch.hub cache")
            return None
        monkeypatch.syspath_prepend(str(hub))
        from dinov2.models.vision_transformer import DinoVisionTransformer
    return DinoVisionTransformer


def official_model(cls, img_size):
    """The dinov2 model of ``RELEASED``'s architecture (as the hub builds them: flat blocks)."""
    return cls(img_size=img_size, patch_size=7, embed_dim=48, depth=3, num_heads=3, init_values=0.1, block_chunks=0)


def perturbed(model, seed=0):
    """Weights away from their init (LayerScale, biases, norms all matter), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def ours_released(path, **kw):
    """A plain model of ours written in the dinov2 layout by our converter (``.safetensors``
    carries ``dinov2_model_args``: offset 0, no antialias; ``.pth`` does not)."""
    model = perturbed(create_vit("vit_tiny_patch14", **{**RELEASED, **kw}))
    write(Backbone.from_model(model), "dinov2", path)
    return model


def dinov2_method(spec="paper", overrides=None, **cfg):
    torch.manual_seed(0)
    config = DINOv2Config(**{**HEADS, "global_crop_size": 28, "local_crop_size": 14, "n_local_crops": 2, **cfg})
    return DINOv2(config, ModelConfig(arch="vit_tiny_patch14", spec=spec, overrides={**RECIPE, **(overrides or {})}),
                  total_steps=10)


def images(n=4, size=28, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- step 0: the official model's function ------------------------------------------------------
@pytest.mark.parametrize("spec", ["none", "paper"])
def test_teacher_at_step0_computes_the_official_dinov2_outputs(tmp_path, monkeypatch, spec):
    torch.manual_seed(0)
    official = perturbed(official_model(official_vit(monkeypatch), 56))
    torch.save(official.state_dict(), tmp_path / "dinov2_release.pth")  # a bare state dict, as the hub's files
    m = dinov2_method(spec, init_from=str(tmp_path / "dinov2_release.pth"), init_from_format="dinov2")
    x = images()
    with torch.no_grad():
        want, got = official.forward_features(x), m.teacher.backbone.forward_features(x)
    torch.testing.assert_close(got["cls_norm"], want["x_norm_clstoken"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["patches_norm"], want["x_norm_patchtokens"], rtol=1e-5, atol=1e-5)
    # The student is the teacher; a specialized one starts with CLS copies of the shared weights.
    assert all(torch.equal(p, q) for p, q in zip(m.teacher.parameters(), m.student.parameters()))
    student = dict(m.student.backbone.named_parameters())
    cls_keys = [k for k in student if is_cls_param(k)]
    assert bool(cls_keys) == (spec == "paper")
    for k in cls_keys:
        if k.endswith(("cls_weight", "cls_bias", "cls_gamma")):
            assert torch.equal(student[k], student[k.replace("cls_", "")]), k
    # dinov2's offset rule mattered: the plain bicubic resize gives other positions.
    pos = official.pos_embed.detach()
    assert not torch.allclose(m.teacher.backbone.pos_embed, resample_pos_embed(pos, (4, 4), has_cls=True), atol=1e-4)


@pytest.mark.parametrize("name", ["reg.safetensors", "reg.pth"])
def test_register_checkpoint_keeps_its_registers(tmp_path, name):
    source = ours_released(tmp_path / name, num_registers=2)
    m = dinov2_method("paper", {"num_registers": 2}, init_from=str(tmp_path / name), init_from_format="dinov2")
    backbone = m.teacher.backbone
    assert torch.equal(backbone.reg_token, source.reg_token)
    if name.endswith(".safetensors"):
        # Our converter records offset 0 / no antialias: at 28 px the teacher computes what the
        # source computes there (resizing its positions at run time by the same rule).
        x = images()
        with torch.no_grad():
            want, got = source.forward_features(x), backbone.forward_features(x)
        for k in ("cls_norm", "registers_norm", "patches_norm"):
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
    else:  # a bare .pth with registers: the hub's register models resize with antialiasing, no offset
        grid = source.pos_embed.detach()[:, 1:].reshape(1, 8, 8, 48).permute(0, 3, 1, 2)
        want = F.interpolate(grid, size=(4, 4), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 16, 48)
        torch.testing.assert_close(backbone.pos_embed.detach()[:, 1:], want)


@pytest.mark.parametrize("read_as,written_as,name", [("dinov2", "dinov2", "d.safetensors"), ("hf", "hf", "hf"),
                                                      ("timm", "timm", "t.safetensors"), ("", "torch", "plain.pt"),
                                                      ("", "safetensors", "paper.safetensors")])
def test_every_source_starts_the_run_at_the_source_function(tmp_path, read_as, written_as, name):
    """Released layouts and our own files, plain or already specialized: at the recipe's 28 px
    the teacher computes what the 56 px source computes on the same input (our ViT, like HF and
    the dinov2 layout our converter writes, resizes its positions bicubically at run time)."""
    source = perturbed(create_vit("vit_tiny_patch14", **RELEASED))
    bb = Backbone.from_model(source)
    if name.startswith("paper"):  # specialized beforehand: convert_checkpoint.py --from dinov2 --spec paper
        write(bb, "dinov2", tmp_path / "d.pth")
        bb = read_released(tmp_path / "d.pth", "dinov2", spec="paper", num_heads=3)
    write(bb, written_as, tmp_path / name)
    m = dinov2_method("paper", init_from=str(tmp_path / name), init_from_format=read_as)
    x = images()
    with torch.no_grad():
        want, got = source.forward_features(x), m.teacher.backbone.forward_features(x)
    for k in ("cls_norm", "patches_norm"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)


# -- refusals, before any work --------------------------------------------------------------------
def refusal(fn) -> str:
    with pytest.raises(ValueError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_mismatched_architecture_is_refused_naming_the_file_and_keys(tmp_path):
    path = tmp_path / "release.pth"
    ours_released(path, num_registers=2)
    msg = refusal(lambda: dinov2_method("paper", {"depth": 4, "num_registers": 2}, init_from=str(path),
                                        init_from_format="dinov2"))
    assert str(path) in msg and "depth file 3 vs recipe 4" in msg and "blocks.3.attn.qkv.weight" in msg
    msg = refusal(lambda: dinov2_method("paper", init_from=str(path), init_from_format="dinov2"))  # no registers
    assert "num_registers file 2 vs recipe 0" in msg and "reg_token" in msg
    msg = refusal(lambda: dinov2_method("paper", {"num_registers": 2, "embed_dim": 64, "num_heads": 4},
                                        init_from=str(path), init_from_format="dinov2"))
    assert "embed_dim file 48 vs recipe 64" in msg and "patch_embed.proj.weight file (48, 3, 7, 7) vs recipe (64, 3, 7, 7)" in msg
    # Our own file records its head count, which the weights cannot show.
    bb = read_released(path, "dinov2", spec="paper", num_heads=3)
    write(bb, "torch", tmp_path / "paper.pt")
    msg = refusal(lambda: dinov2_method("paper", {"num_registers": 2, "num_heads": 6}, init_from=str(tmp_path / "paper.pt")))
    assert "num_heads file 3 vs recipe 6" in msg
    # A specialized file starts only a run with its own specialization.
    msg = refusal(lambda: dinov2_method("norm", {"num_registers": 2}, init_from=str(tmp_path / "paper.pt")))
    assert "does not fit model.spec" in msg and "blocks.0.attn.qkv.cls_weight" in msg
    # A released file read as ours names the setting that reads it.
    msg = refusal(lambda: dinov2_method("paper", {"num_registers": 2}, init_from=str(path)))
    assert "method.init_from_format" in msg
    msg = refusal(lambda: DINOv2Config(init_from=str(path), init_from_format="dinov3"))
    assert "method.init_from_format='dinov3'" in msg


# -- heads ------------------------------------------------------------------------------------------
def dinov2_training_heads(seed, **head):
    """DINO/iBOT heads as a dinov2 training checkpoint holds them: weight_norm prototypes
    (``weight_g`` fixed at 1, ``weight_v``), under ``model.student.`` and ``model.teacher.``."""
    torch.manual_seed(seed)
    sd = {}
    for role in ("student", "teacher"):
        for name in ("dino_head", "ibot_head"):
            h = DINOHead(48, **{"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, **head}).state_dict()
            v = h.pop("last_layer.weight") * 3.0  # any scale: only the direction is used
            h.update({"last_layer.weight_v": v, "last_layer.weight_g": torch.ones(v.shape[0], 1)})
            sd.update({f"{role}.{name}.{k}": t for k, t in h.items()})
    return {"model": sd, "iteration": 1000}


def test_heads_start_fresh_or_from_a_dinov2_training_checkpoint(tmp_path):
    release = tmp_path / "release.pth"
    ours_released(release)
    fresh = dinov2_method(init_from=str(release), init_from_format="dinov2")
    torch.save(dinov2_training_heads(1), tmp_path / "model_final.pth")
    m = dinov2_method(init_from=str(release), init_from_format="dinov2", head_init_from=str(tmp_path / "model_final.pth"),
                      ibot_separate_head=True)
    ckpt = dinov2_training_heads(1)["model"]
    for branch in (m.student, m.teacher):  # both from the file's teacher heads
        for name in ("dino_head", "ibot_head"):
            got = getattr(branch, name).state_dict()
            assert torch.equal(got["mlp.0.weight"], ckpt[f"teacher.{name}.mlp.0.weight"])
            assert torch.equal(got["last_layer.weight"], ckpt[f"teacher.{name}.last_layer.weight_v"])
    assert not torch.equal(fresh.student.dino_head.mlp[0].weight, m.student.dino_head.mlp[0].weight)
    x = torch.randn(5, 48)  # dinov2's head: normalize(mlp(x)) @ (g * v / |v|).T with g = 1
    v, z = ckpt["teacher.dino_head.last_layer.weight_v"], F.normalize(m.student.dino_head.mlp(x), dim=-1)
    torch.testing.assert_close(m.student.dino_head(x), z @ (v / v.norm(dim=1, keepdim=True)).T)

    bad = dinov2_training_heads(1, out_dim=64)
    torch.save(bad, tmp_path / "other_prototypes.pth")
    msg = refusal(lambda: dinov2_method(head_init_from=str(tmp_path / "other_prototypes.pth")))
    assert "dino_head.last_layer.weight file (64, 16) vs recipe (32, 16)" in msg
    bad = dinov2_training_heads(1)
    bad["model"]["teacher.dino_head.last_layer.weight_g"] *= 2
    torch.save(bad, tmp_path / "trained_gain.pth")
    msg = refusal(lambda: dinov2_method(head_init_from=str(tmp_path / "trained_gain.pth")))
    assert "dino_head.last_layer.weight_g is not all ones" in msg


# -- the head trained alone -------------------------------------------------------------------------
def batch(cfg, n=4, seed=0):
    import numpy as np
    from PIL import Image

    from lspretrain.data import DINOv2Collate, DINOv2MultiCrop

    rng = np.random.default_rng(seed)
    crops = DINOv2MultiCrop(global_size=cfg.global_crop_size, local_size=cfg.local_crop_size, n_local=cfg.n_local_crops)
    collate = DINOv2Collate(patch_size=7, global_size=cfg.global_crop_size, photometric=crops.photometric)
    pics = [Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)) for _ in range(n)]
    return collate([{"image": crops(p), "label": i, "key": str(i)} for i, p in enumerate(pics)])


def test_frozen_backbone_is_bit_identical_under_adamw_with_weight_decay(tmp_path):
    from lspretrain.engine.config import StrategyConfig
    from lspretrain.engine.dist import DistEnv
    from lspretrain.engine.optim import OptimConfig
    from lspretrain.engine.strategies import build_strategy

    release = tmp_path / "release.pth"
    ours_released(release)
    frozen_steps = 3
    m = dinov2_method(init_from=str(release), init_from_format="dinov2", freeze_backbone_steps=frozen_steps,
                      freeze_last_layer_steps=0)
    strategy = build_strategy(StrategyConfig(name="single", precision="fp32"), DistEnv(), torch.device("cpu"))
    strategy.setup(m, OptimConfig(lr=1e-2, weight_decay=0.3, clip_grad=None), micro_batch=4)
    start = {n: p.detach().clone() for n, p in m.state_dict().items()}

    def step(i):
        loss, _ = strategy.forward(batch(m.cfg, seed=i), i)
        strategy.backward(loss)
        assert strategy.clip_and_step(0.0, skip=False).applied
        m.after_step(i, strategy)

    for i in range(frozen_steps):
        step(i)
    now = m.state_dict()
    for name, t in start.items():
        if ".backbone." in name:  # student and teacher backbones: not a bit moved, no decay
            assert torch.equal(now[name], t), name
    assert not torch.equal(now["student.dino_head.mlp.0.weight"], start["student.dino_head.mlp.0.weight"])
    # AdamW never stepped the backbone: its state is the fresh one (kept so that a checkpoint taken
    # now has every parameter's state), with no step count that would skew its bias correction later.
    for p in m.student.backbone.parameters():
        state = strategy.optimizer.state[p]
        assert state["step"].item() == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    step(frozen_steps)
    assert not torch.equal(m.student.backbone.blocks[0].attn.qkv.weight, start["student.backbone.blocks.0.attn.qkv.weight"])


def test_frozen_backbone_is_refused_where_parameters_need_gradients():
    recipe = {"method": {"name": "dinov2", **HEADS, "freeze_backbone_steps": 5},
              "model": {"arch": "vit_tiny_patch14", "overrides": RECIPE},
              "optim": {"lr": 1e-3}, "strategy": {"name": "deepspeed"}, "data_source": "synthetic"}
    assert "needs strategy.name single or fsdp2" in refusal(lambda: load_config(recipe))


# -- a continued run on Fashion-MNIST ------------------------------------------------------------------
@pytest.fixture(scope="module")
def fashion_mnist(tmp_path_factory):
    """512 Fashion-MNIST training images as PNG shards (Debian's dataset-fashion-mnist)."""
    from lspretrain.data.shard_writer import (FASHION_MNIST_CLASSES, EncodeOptions, find_fashion_mnist, idx_items,
                                              index_path, write_shards)

    folder = find_fashion_mnist(None)
    if folder is None:
        pytest.fail("Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
    out = str(tmp_path_factory.mktemp("fashion_mnist"))
    items = idx_items(f"{folder}/train-images-idx3-ubyte.gz", f"{folder}/train-labels-idx1-ubyte.gz")[:512]
    write_shards(items, out, "train", FASHION_MNIST_CLASSES, max_count=256, shuffle_seed=0,
                 options=EncodeOptions(encode="png"), num_workers=1)
    return index_path(out, "train")


STEPS, FROZEN = 4, 2


def continue_recipe(run_dir, index, spec, release) -> dict:
    return {
        "run": {"dir": str(run_dir), "seed": 0, "total_steps": STEPS},
        "model": {"arch": "vit_tiny_patch14", "spec": spec, "overrides": {**RECIPE, "drop_path_rate": 0.1}},
        "method": {"name": "dinov2", **HEADS, "global_crop_size": 28, "local_crop_size": 14, "n_local_crops": 2,
                   "init_from": str(release), "init_from_format": "dinov2", "freeze_backbone_steps": FROZEN,
                   "freeze_last_layer_steps": 0, "momentum_teacher": 0.9, "final_momentum_teacher": 0.9,
                   "warmup_teacher_temp_steps": 0},
        "optim": {"name": "adamw", "lr": 1e-3, "warmup_steps": 1, "weight_decay": 0.04, "clip_grad": 3.0},
        "strategy": {"name": "single", "precision": "fp32"},
        "checkpoint": {"every": FROZEN, "keep_last": 5},
        "log": {"every": 1, "tensorboard": False},
        "data_source": "webdataset",
        "data": {"index": index, "mode": "resampled", "batch_size": 8, "num_workers": 1, "require_label": False},
    }


@pytest.mark.parametrize("spec", ["none", "paper"])
def test_continued_run_starts_from_the_release_resumes_exactly_and_exports(tmp_path, monkeypatch, fashion_mnist, spec):
    """From weights made by dinov2's own model code where it is installed, else by our converter."""
    release = tmp_path / "release.pth"
    official = official_vit(monkeypatch, required=False)
    if official is None:
        source = ours_released(release)
    else:
        torch.manual_seed(0)
        source = perturbed(official_model(official, 56))
        torch.save(source.state_dict(), release)
    full = run_worker(continue_recipe(tmp_path / "full", fashion_mnist, spec, release))
    assert full["status"] == "completed" and full["step"] == STEPS
    stopped = run_worker(continue_recipe(tmp_path / "resumed", fashion_mnist, spec, release), signal_at=0)
    assert stopped["status"] == "preempted" and stopped["step"] == 1
    resumed = run_worker(continue_recipe(tmp_path / "resumed", fashion_mnist, spec, release))
    assert resumed["status"] == "completed" and resumed["step"] == STEPS

    want, got = read_merged(tmp_path / "full"), read_merged(tmp_path / "resumed")
    for step in range(1, STEPS + 1):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-6, abs=1e-7), step
    final = {which: read_source(tmp_path / "full", which) for which in ("teacher", "student")}
    for which, bb in final.items():  # the resumed run ends on the very same weights
        again = read_source(tmp_path / "resumed", which).state_dict
        assert all(torch.equal(v, again[k]) for k, v in bb.state_dict.items()), which
    # The head trained alone for FROZEN steps: both backbones were still the imported release then, bit for bit.
    imported = dinov2_method(spec, init_from=str(release), init_from_format="dinov2").teacher.backbone.state_dict()
    at_frozen = tmp_path / "full" / "checkpoints" / f"step_{FROZEN:08d}"
    for which in ("teacher", "student"):
        sd = read_source(at_frozen, which).state_dict
        assert all(torch.equal(v, imported[k]) for k, v in sd.items()), which
    assert not torch.equal(final["student"].state_dict["blocks.0.attn.qkv.weight"], imported["blocks.0.attn.qkv.weight"])
    x = images()

    teacher = final["teacher"].build()
    with torch.no_grad():
        ref = teacher.forward_features(x)
    if spec == "none":  # back to the dinov2 layout: the same function in the released model's form
        write(read_source(tmp_path / "full"), "dinov2", tmp_path / "continued.pth")  # convert_checkpoint.py --to dinov2
        exported = torch.load(tmp_path / "continued.pth", weights_only=True)
        assert set(exported) == set(torch.load(release, weights_only=True))
        back = read_released(tmp_path / "continued.pth", "dinov2", num_heads=3).build()
    else:  # the specialized CLS path has no slot in the dinov2 layout: safetensors keeps it
        write(read_source(tmp_path / "full"), "safetensors", tmp_path / "continued.safetensors")  # --to safetensors
        back = load_backbone(tmp_path / "continued.safetensors").build()
        assert back.specialization.qkv == "first_third"
        cls_w = back.state_dict()["blocks.0.norm1.cls_weight"]
        assert not torch.equal(cls_w, back.state_dict()["blocks.0.norm1.weight"])  # the CLS path diverged
    with torch.no_grad():
        out = back.forward_features(x)
    for k in ("cls_norm", "patches_norm"):
        assert torch.equal(out[k], ref[k]), k
    if spec == "none" and official is not None:  # and dinov2's own model runs the exported file
        theirs = official_model(official, 28).eval()
        theirs.load_state_dict(exported, strict=True)
        with torch.no_grad():
            out = theirs.forward_features(x)
        torch.testing.assert_close(out["x_norm_clstoken"], ref["cls_norm"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["x_norm_patchtokens"], ref["patches_norm"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        before = source.forward_features(x)
    before = before["cls_norm"] if official is None else before["x_norm_clstoken"]
    assert not torch.allclose(ref["cls_norm"], before)  # it trained

    # Another run continues from this one: its teacher backbone, and its teacher heads on request.
    from lspretrain.engine.safe_load import dcp_load

    again = dinov2_method(spec, init_from=str(tmp_path / "full"), head_init_from=str(tmp_path / "full"))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in again.student.backbone.state_dict().items())
    saved = {"model.teacher.dino_head.last_layer.weight": torch.empty(HEADS["head_prototypes"], HEADS["head_bottleneck_dim"])}
    dcp_load(saved, tmp_path / "full" / "checkpoints" / f"step_{STEPS:08d}" / "state", no_dist=True)
    assert torch.equal(again.teacher.dino_head.last_layer.weight, saved["model.teacher.dino_head.last_layer.weight"])


# -- DeiT-III from timm weights --------------------------------------------------------------------------
DEIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, layerscale_init=1e-4, pos_embed_cls=False)


def test_deit3_fine_tune_starts_from_a_timm_state_dict_specialized(tmp_path):
    source = perturbed(create_vit("vit_tiny_patch16", **DEIT))
    write(Backbone.from_model(source), "timm", tmp_path / "deit3.pth")
    sd = torch.load(tmp_path / "deit3.pth", weights_only=True)
    sd.update({"head.weight": torch.randn(10, 48), "head.bias": torch.zeros(10)})  # timm's classifier: read past
    torch.save(sd, tmp_path / "deit3.pth")

    def classifier(img_size, spec="paper"):
        torch.manual_seed(0)
        cfg = ClassificationConfig(num_classes=10, init_from=str(tmp_path / "deit3.pth"), init_from_format="timm")
        return Classification(cfg, ModelConfig(arch="vit_tiny_patch16", spec=spec, overrides={**DEIT, "img_size": img_size}))

    same = classifier(32)
    x = images(size=32)
    with torch.no_grad():
        torch.testing.assert_close(same.backbone.forward_features(x)["patches_norm"], source.forward_features(x)["patches_norm"],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(same.backbone(x), source(x), rtol=1e-5, atol=1e-5)
    assert any(is_cls_param(k) for k in same.backbone.state_dict())
    bigger = classifier(48)  # a fine-tune at another resolution: DeiT-III's bicubic resize of the positions
    torch.testing.assert_close(bigger.backbone.pos_embed.detach(), resample_pos_embed(source.pos_embed.detach(), (6, 6), False))
    msg = refusal(lambda: Classification(
        ClassificationConfig(num_classes=10, init_from=str(tmp_path / "deit3.pth"), init_from_format="timm"),
        ModelConfig(arch="vit_tiny_patch16", spec="paper", overrides={**DEIT, "pos_embed_cls": True})))
    assert "pos_embed_cls file False vs recipe True" in msg

    recipe = {
        "run": {"dir": str(tmp_path / "ft"), "seed": 0, "total_steps": 3},
        "model": {"arch": "vit_tiny_patch16", "spec": "paper", "overrides": DEIT},
        "method": {"name": "classification", "num_classes": 10, "loss": "ce", "label_smoothing": 0.1,
                   "init_from": str(tmp_path / "deit3.pth"), "init_from_format": "timm"},
        "optim": {"name": "adamw", "lr": 1e-3, "warmup_steps": 1, "weight_decay": 0.05},
        "strategy": {"name": "single", "precision": "fp32"},
        "checkpoint": {"every": 0, "keep_last": 1},
        "log": {"every": 1, "tensorboard": False},
        "data_source": "synthetic",
        "synthetic": {"batch_size": 8, "img_size": 32, "num_classes": 10},
    }
    assert run_worker(recipe)["status"] == "completed"
    tuned = read_source(tmp_path / "ft").state_dict
    assert not torch.equal(tuned["blocks.0.norm1.cls_weight"], tuned["blocks.0.norm1.weight"])  # the CLS path diverged


# -- recipes ----------------------------------------------------------------------------------------
def test_continue_recipes_load(tmp_path):
    (tmp_path / "x-000000.tar").touch()  # the config checks that a local shard spec names a file
    shards = [f"data.shards={tmp_path}/x-{{000000..000009}}.tar", f"eval.shards={tmp_path}/x-{{000000..000009}}.tar"]
    cfg = load_config(ROOT / "recipes/dinov2/vitl14_continue_paper.yaml",
                      shards + ["method.init_from=init/dinov2_vitl14_pretrain.pth"])
    m = cfg.method
    assert (cfg.model.arch, cfg.model.spec, m.init_from_format) == ("vit_large_patch14", "paper", "dinov2")
    assert m.momentum_teacher == m.final_momentum_teacher == 0.999 and m.freeze_last_layer_steps == 0
    assert m.freeze_backbone_steps == 1250 and cfg.optim.warmup_steps < cfg.run.total_steps // 10
    paper = yaml.safe_load((ROOT / "recipes/dinov2/vitl14_paper.yaml").read_text())
    assert cfg.optim.lr <= paper["optim"]["lr"] / 10
    assert cfg.strategy.name in ("single", "fsdp2")  # a frozen backbone needs one of them
    timm = load_config(ROOT / "recipes/deit3/vitl16_ft224_from_timm_paper.yaml", shards)
    assert (timm.method.init_from_format, timm.model.spec) == ("timm", "paper")
