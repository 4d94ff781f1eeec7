"""DINOv2 under real 2-rank gloo runs: fsdp2 and DeepSpeed train, are stopped by a signal and
resume exactly; the teacher EMA on FSDP2 shards equals the unsharded formula."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from data_fixtures import make_shards
from engine_helpers import free_port, read_merged, spawn, tiny_recipe

STEPS = 5


def dinov2_recipe(run_dir, shards, strategy: dict, steps=STEPS, **extra):
    recipe = tiny_recipe(run_dir, steps=steps, batch=4, strategy=strategy)
    recipe.update({
        "model": {"arch": "vit_tiny_patch14", "spec": "paper",
                  "overrides": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
                                "layerscale_init": 0.1, "drop_path_rate": 0.2}},
        "method": {"name": "dinov2", "head_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16,
                   "global_crop_size": 16, "local_crop_size": 8, "n_local_crops": 2, "warmup_teacher_temp_steps": 3,
                   "freeze_last_layer_steps": 2},
        "data_source": "webdataset",
        "data": {"shards": shards, "mode": "resampled", "batch_size": 4, "num_workers": 1, "require_label": False},
        "eval": {"every": STEPS, "shards": shards, "train_shards": shards, "max_samples": 32, "batch_size": 16},
    })
    recipe["optim"]["warmup_steps"] = 1
    recipe.update(extra)
    return recipe


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(str(tmp_path_factory.mktemp("shards")), n=48, per_shard=12, size=20)


@pytest.mark.parametrize("strategy", [{"name": "fsdp2", "precision": "fp32"},
                                      {"name": "deepspeed", "precision": "fp32", "deepspeed": {"stage": 2}}],
                         ids=["fsdp2", "deepspeed-zero2"])
def test_dinov2_two_ranks_train_and_resume_exactly(tmp_path, shards, strategy):
    full = spawn(2, dinov2_recipe(tmp_path / "full", shards, strategy))
    assert full["status"] == "completed" and full["step"] == STEPS
    stopped = spawn(2, dinov2_recipe(tmp_path / "resumed", shards, strategy), signal_at=2)
    assert stopped["status"] == "preempted" and stopped["step"] == 3  # the step in flight finishes, then saves
    resumed = spawn(2, dinov2_recipe(tmp_path / "resumed", shards, strategy))
    assert resumed["status"] == "completed" and resumed["step"] == STEPS
    want, got = read_merged(tmp_path / "full"), read_merged(tmp_path / "resumed")
    for step in range(1, STEPS + 1):
        for key in ("loss", "loss/dino", "loss/ibot", "loss/koleo"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-6), (step, key)
    assert want[STEPS]["loss/dino"] != want[1]["loss/dino"]  # it trained
    assert 0.0 <= got[STEPS]["eval/knn_top1"] <= 100.0
    assert got[STEPS]["eval/knn_top1"] == pytest.approx(want[STEPS]["eval/knn_top1"])


def _ema_worker(rank, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from lspretrain.engine.config import ModelConfig, StrategyConfig
    from lspretrain.engine.dist import init_distributed
    from lspretrain.engine.optim import OptimConfig
    from lspretrain.engine.strategies import build_strategy
    from lspretrain.engine.strategies.base import local_tensors
    from lspretrain.methods.dinov2 import DINOv2, DINOv2Config

    env, device = init_distributed("cpu", need_group=True)
    torch.manual_seed(0)
    method = DINOv2(DINOv2Config(head_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16),
                    ModelConfig(arch="vit_tiny_patch14", spec="paper_lora",
                                overrides={"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}),
                    total_steps=10)
    strategy = build_strategy(StrategyConfig(name="fsdp2", precision="fp32"), env, device)
    strategy.setup(method, OptimConfig(lr=1e-3), micro_batch=2)
    with torch.no_grad():  # move the student by a constant per parameter: the same on any sharding
        for i, p in enumerate(method.student.parameters()):
            for shard in local_tensors(p):
                shard.add_(0.01 * (i + 1))
    method.after_step(4, strategy)
    teacher = {n: p.full_tensor() for n, p in method.teacher.named_parameters()}
    if rank == 0:
        torch.save({"teacher": teacher, "momentum": method.momentum(4)}, out)
    import torch.distributed as dist

    dist.destroy_process_group()


def test_teacher_ema_on_fsdp2_shards_matches_unsharded(tmp_path):
    out = tmp_path / "teacher.pt"
    mp.spawn(_ema_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    from lspretrain.engine.config import ModelConfig
    from lspretrain.methods.dinov2 import DINOv2, DINOv2Config

    torch.manual_seed(0)
    ref = DINOv2(DINOv2Config(head_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16),
                 ModelConfig(arch="vit_tiny_patch14", spec="paper_lora",
                             overrides={"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}),
                 total_steps=10)
    m = got["momentum"]
    assert 0.992 < m < 1.0
    names = [n for n, _ in ref.student.named_parameters()]
    assert set(names) == set(got["teacher"])
    for i, (name, p) in enumerate(ref.student.named_parameters()):
        # teacher = student at start, so m * t + (1 - m) * (s + c) = t + (1 - m) * c
        expected = p.detach() + (1 - m) * 0.01 * (i + 1)
        torch.testing.assert_close(got["teacher"][name], expected, rtol=0, atol=1e-6)
