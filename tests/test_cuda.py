"""Every training path on CUDA, in one process (``pytest tests/test_cuda.py``; ``benchmarks/
gpu_check.sh`` runs it within 220 s, the compile tests last): both methods on each strategy (single, ddp,
fsdp2, deepspeed at 1 rank over NCCL) in bf16, activation checkpointing full / selective,
per-block compile, photometrics on the device, a save and resume with the same losses,
the evaluation hooks, and conversion of the CUDA-trained run; plus the step's method side
never reading the device from the host, and the specialized layers' forms on CUDA.

Skipped where CUDA is absent (CI); the DeepSpeed tests also where ``deepspeed`` is not
installed, which can only happen on a CUDA machine (the wheel list of gpu_check.sh has it).
"""
from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from data_fixtures import make_shards
from test_specialize import outputs_and_grads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA tests: no CUDA device here")

DEVICE = torch.device("cuda", 0)
STEPS = 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """96 labelled 48-px JPEGs (label = id % 10) in 2 shards: training and evaluation data."""
    return make_shards(str(tmp_path_factory.mktemp("shards")), 96, 48, size=48, encode="jpeg")


def dinov2_recipe(run_dir: Path, shards: str, strategy: str = "fsdp2", spec: str = "paper", steps: int = STEPS,
                  **strategy_kw) -> dict:
    return {
        "run": {"dir": str(run_dir), "total_steps": steps, "device": "cuda"},
        "model": {"arch": "vit_small_patch14", "spec": spec,
                  "overrides": {"img_size": 56, "embed_dim": 128, "depth": 4, "num_heads": 2, "drop_path_rate": 0.1,
                                "drop_path_uniform": True}},
        "method": {"name": "dinov2", "head_prototypes": 256, "head_hidden_dim": 128, "head_bottleneck_dim": 64,
                   "ibot_separate_head": True, "global_crop_size": 56, "local_crop_size": 28, "n_local_crops": 2,
                   "freeze_last_layer_steps": 1, "warmup_teacher_temp_steps": 2},
        "optim": {"name": "adamw", "lr": 1e-3, "warmup_steps": 1, "clip_grad": 3.0},
        "strategy": {"name": strategy, "precision": "bf16", **strategy_kw},
        "checkpoint": {"every": 0, "save_final": False},
        "log": {"every": 1, "tensorboard": False, "peak_flops": 989e12},
        "data": {"shards": shards, "mode": "resampled", "batch_size": 8, "num_workers": 2, "require_label": False},
    }


def deit3_recipe(run_dir: Path, shards: str, strategy: str = "fsdp2", spec: str = "paper", steps: int = STEPS,
                 **strategy_kw) -> dict:
    return {
        "run": {"dir": str(run_dir), "total_steps": steps, "device": "cuda"},
        "model": {"arch": "vit_small_patch16", "spec": spec,
                  "overrides": {"img_size": 48, "embed_dim": 128, "depth": 4, "num_heads": 2, "layerscale_init": 1e-4,
                                "drop_path_rate": 0.1, "pos_embed_cls": False}},
        "method": {"name": "classification", "num_classes": 10, "loss": "bce", "augment": "three_augment",
                   "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "repeats": 2, "ema_momentum": 0.99},
        "optim": {"name": "lamb", "lr": 3e-3, "warmup_steps": 1, "weight_decay": 0.05, "clip_grad": 1.0},
        "strategy": {"name": strategy, "precision": "bf16", **strategy_kw},
        "checkpoint": {"every": 0, "save_final": False},
        "log": {"every": 1, "tensorboard": False, "peak_flops": 989e12},
        "data": {"shards": shards, "mode": "epoch", "batch_size": 8, "num_workers": 2},
    }


RECIPES = {"dinov2": dinov2_recipe, "classification": deit3_recipe}


def read_series(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """tag -> (steps, values) of a metrics.jsonl, the records of one step merged (training and
    evaluation lines), a later record's value winning (a resumed run's)."""
    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rows.setdefault(rec["step"], {}).update(rec)
    series: dict[str, tuple[list[int], list[float]]] = {}
    for step in sorted(rows):
        for tag, value in rows[step].items():
            if tag not in ("step", "time"):
                series.setdefault(tag, ([], []))[0].append(step)
                series[tag][1].append(float(value))
    return series


def train(recipe: dict):
    """Build and fit in this process (one NCCL group for every test); -> (trainer, result, metrics)."""
    from lspretrain.engine.config import load_config
    from lspretrain.train import build

    trainer, _ = build(load_config(recipe))
    result = trainer.fit()
    return trainer, result, read_series(Path(recipe["run"]["dir"]))


def check_run(trainer, result, metrics, steps: int = STEPS) -> None:
    assert result.status == "completed" and result.step == steps
    steps_logged, losses = metrics["train/loss"]
    assert steps_logged == list(range(1, steps + 1)) and all(math.isfinite(v) for v in losses), losses
    assert next(trainer.method.parameters()).device.type == "cuda"
    for key in ("perf/images_per_s", "perf/step_time_s", "perf/mfu", "memory/cuda_max_allocated_gib"):
        assert key in metrics and metrics[key][1][-1] > 0, key


def needs_deepspeed(strategy: str) -> None:
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed", reason="deepspeed is not installed on this CUDA machine")


# -- every method on every strategy ------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp2", "deepspeed"])
@pytest.mark.parametrize("method", ["dinov2", "classification"])
def test_method_on_strategy(tmp_path, shards, method, strategy):
    needs_deepspeed(strategy)
    check_run(*train(RECIPES[method](tmp_path / "run", shards, strategy)))


@pytest.mark.parametrize("ac", ["full", "selective"])
@pytest.mark.parametrize("method", ["dinov2", "classification"])
def test_activation_checkpointing(tmp_path, shards, method, ac):
    check_run(*train(RECIPES[method](tmp_path / "run", shards, "fsdp2", activation_checkpointing=ac)))


def test_phase_times_are_logged(tmp_path, shards):
    recipe = dinov2_recipe(tmp_path / "run", shards)
    recipe["log"]["phase_times"] = True
    trainer, result, metrics = train(recipe)
    check_run(trainer, result, metrics)
    for phase in ("data", "forward", "backward", "collective", "optimizer", "ema"):
        assert f"perf/{phase}_s" in metrics, phase


# -- save, resume, evaluate, convert ------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed"])
def test_resume_continues_with_the_same_losses_and_converts(tmp_path, shards, strategy):
    """4 steps saving at 2 and 4; step 4's checkpoint removed; the resumed run repeats steps 3-4 with
    the same losses (the first one from identical state, data and RNG; the second after one more
    update, up to nondeterministic CUDA reductions). The run then converts like a CPU run."""
    needs_deepspeed(strategy)
    from lspretrain.convert import read_source, write
    from lspretrain.convert.native import load_backbone
    from lspretrain.models import routed_modules

    run_dir = tmp_path / "run"
    recipe = dinov2_recipe(run_dir, shards, strategy, steps=4)
    recipe["checkpoint"] = {"every": 2, "keep_last": 5, "save_final": True}
    _, _, first = train(recipe)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    trainer, result, again = train(recipe)
    assert result.step == 4
    losses1, losses2 = (dict(zip(*m["train/loss"])) for m in (first, again))
    assert losses2[3] == pytest.approx(losses1[3], rel=1e-4)
    assert losses2[4] == pytest.approx(losses1[4], rel=5e-3)

    # DeepSpeed's fp32 masters are the student's (the teacher is not optimized); DCP saved both
    which = "teacher" if strategy == "fsdp2" else "student"
    bb = read_source(run_dir, which=which)
    if strategy == "fsdp2":
        teacher = trainer.method.teacher.backbone
        live = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).float().cpu() for k, v in teacher.state_dict().items()}
        assert live.keys() == bb.state_dict.keys()
        for k in live:
            torch.testing.assert_close(bb.state_dict[k].float(), live[k], rtol=0, atol=0, msg=k)
    write(bb, "torch", tmp_path / "teacher.pt")
    model = load_backbone(tmp_path / "teacher.pt").build().to(DEVICE).eval()
    assert routed_modules(model)  # the specialized CLS path came through
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 56, 56, device=DEVICE))
    assert out.shape == (2, 128) and torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["dinov2", "classification"])
def test_evaluation_hooks(tmp_path, shards, method):
    recipe = RECIPES[method](tmp_path / "run", shards, "fsdp2", steps=2)
    recipe["eval"] = {"every": 2, "shards": shards, "train_shards": shards, "max_samples": 48, "batch_size": 16}
    trainer, result, metrics = train(recipe)
    check_run(trainer, result, metrics, steps=2)
    keys = ("eval/knn_top1", "eval/knn_top5") if method == "dinov2" else ("eval/top1", "eval/top5", "eval/ema_top1")
    for key in keys:
        assert key in metrics and 0 <= metrics[key][1][-1] <= 100, key


# -- the method's side of a step: on the device, no host synchronization ----------------------------
def _method_and_batch(shards: str, method: str):
    """A method on CUDA and one of its loader's batches as the trainer hands it over (uint8 crops:
    photometrics on the device, the CUDA default)."""
    from lspretrain.engine.config import load_config
    from lspretrain.methods import build_method

    cfg = load_config(RECIPES[method](Path("/nonexistent"), shards))
    torch.manual_seed(0)
    m = build_method(cfg.method, cfg.model, cfg.run.total_steps).to(DEVICE)
    batch = next(iter(m.build_loader(cfg.training_data, cfg.run.device, 0, 1)))
    return m, {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}


@pytest.mark.parametrize("method", ["dinov2", "classification"])
def test_method_step_never_waits_for_the_device(shards, method):
    """Forward (device photometrics, mixup, teacher, losses, metrics) and backward of a method
    queue work without a single host synchronization (after one warm-up, which makes the
    per-device constants); metrics live where the loss lives."""
    m, batch = _method_and_batch(shards, method)
    images = "global_crops" if method == "dinov2" else "images"
    assert batch[images].dtype == torch.uint8  # "auto" put the photometrics on this device
    with torch.autocast("cuda", dtype=torch.bfloat16):
        m(batch, step=5)[0].backward()
    m.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, metrics = m(batch, step=5)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss) and all(v.device == loss.device for v in metrics.values())


def test_three_augment_on_cuda_applies_exactly_one_of_gray_solarize_blur():
    from lspretrain.data.photometric import IMAGENET_MEAN, IMAGENET_STD, ThreeAugmentPhotometric, solarize

    torch.manual_seed(0)
    x = torch.rand(30, 3, 16, 16, device=DEVICE)
    out = ThreeAugmentPhotometric(jitter=0.0)(x.clone())
    mean, std = (torch.tensor(v, device=DEVICE).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
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


# -- the specialized layers on CUDA -------------------------------------------------------------------
def _tiny(spec: str = "none"):
    from lspretrain.models import build_backbone

    torch.manual_seed(0)
    return build_backbone("vit_small_patch14", spec, img_size=56, embed_dim=128, depth=3, num_heads=2,
                          layerscale_init=0.1, num_registers=1).to(DEVICE)


def _randomize_cls(model):
    from lspretrain.models import is_cls_param

    g = torch.Generator(device=DEVICE).manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_cls_param(name):
                p.add_(0.1 * torch.randn(p.shape, device=DEVICE, generator=g))
    return model


@pytest.mark.parametrize("spec", ["norm_ls", "paper", "paper_lora"])
def test_specialized_equals_plain_at_conversion_on_cuda(spec):
    from lspretrain.models import specialize

    plain = _tiny().eval()
    special = specialize(copy.deepcopy(plain), spec).eval()
    x = torch.randn(2, 3, 56, 56, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(special.forward_features(x)["prenorm"], plain.forward_features(x)["prenorm"],
                                   rtol=1e-4, atol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            torch.testing.assert_close(special(x).float(), plain(x).float(), rtol=1e-2, atol=1e-2)


def test_fused_adamw_and_foreach_lamb_on_dtensor_shards(tmp_path, shards):
    """fsdp2's optimizers on CUDA: AdamW fused (one kernel for every shard), LAMB foreach; a
    trained run moves every parameter the optimizer owns."""
    trainer, result, metrics = train(deit3_recipe(tmp_path / "run", shards, "fsdp2", steps=2))
    check_run(trainer, result, metrics, steps=2)
    from lspretrain.engine.optim import Lamb

    assert isinstance(trainer.strategy.optimizer, Lamb)
    dino, *_ = train(dinov2_recipe(tmp_path / "run2", shards, "fsdp2", steps=1))
    assert all(g.get("fused") for g in dino.strategy.optimizer.param_groups)


# -- compilation last: the slowest tests (Triton builds kernels) ---------------------------------------
@pytest.mark.parametrize("method", ["dinov2", "classification"])
def test_compile_matches_eager_at_the_first_step(tmp_path, shards, method):
    """Per-block compile (with full checkpointing, the recipes' combination) trains, and its first
    loss is the eager one up to bf16 rounding (same weights, same batch; no drop path, whose
    random draws differ between eager and compiled code)."""
    runs = []
    for name, compile_ in (("eager", False), ("compiled", True)):
        recipe = RECIPES[method](tmp_path / name, shards, "fsdp2", activation_checkpointing="full", compile=compile_)
        recipe["model"]["overrides"]["drop_path_rate"] = 0.0
        runs.append(train(recipe))
    eager, compiled = runs
    check_run(*compiled)
    first = [m["train/loss"][1][0] for m in (eager[2], compiled[2])]
    assert first[1] == pytest.approx(first[0], rel=2e-2)


@pytest.mark.parametrize("spec", ["paper", "paper_lora"])
def test_compiled_routed_block_matches_eager_without_graph_breaks(spec):
    """The traced forms of the routed layers (one fused expression per layer) give the eager
    Function's values and gradients on CUDA, and a specialized block compiles to one graph."""
    model = _randomize_cls(_tiny(spec)).train()
    blk = model.blocks[0]
    x = torch.randn(4, 18, 128, device=DEVICE, requires_grad=True)
    explained = torch._dynamo.explain(blk)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    (y0, dx0, g0), (y1, dx1, g1) = (outputs_and_grads(blk, fn, x) for fn in (blk, torch.compile(blk)))
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx1, dx0, rtol=1e-4, atol=1e-5)
    assert any(n.rsplit(".", 1)[-1].startswith("cls_") for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-3, atol=1e-5, msg=n)
