"""Optimizer groups (weight decay, layer-wise lr decay, CLS twins), LAMB and build_optimizer."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from lspretrain.engine.optim import Lamb, OptimConfig, build_optimizer, canonical_name, param_groups, scaled_lr
from lspretrain.models import build_backbone, is_cls_param

DEPTH = 3
DECAYED_LEAVES = ("patch_embed.proj.weight", "qkv.weight", "qkv.cls_weight", "qkv.cls_lora_a", "qkv.cls_lora_b",
                  "attn.proj.weight", "fc1.weight", "fc2.weight", "head.weight", "mlp.0.weight")
TWIN = {"cls_weight": "weight", "cls_bias": "bias", "cls_gamma": "gamma", "cls_lora_a": "weight",
        "cls_lora_b": "weight", "cls_bias_delta": "bias"}


def tiny(spec: str = "paper") -> nn.Module:
    return build_backbone("vit_tiny_patch16", spec, embed_dim=32, depth=DEPTH, num_heads=2, img_size=32,
                          layerscale_init=1e-5, num_registers=2, mask_token=True)


def by_name(groups: list[dict]) -> dict[str, tuple[int, float, float]]:
    """name -> (group index, lr_scale, wd_scale)."""
    out = {}
    for i, g in enumerate(groups):
        assert len(g["params"]) == len(g["param_names"])
        for n in g["param_names"]:
            out[n] = (i, g["lr_scale"], g["wd_scale"])
    return out


def expected_lr_scale(name: str, decay: float, pe_mult: float) -> float:
    name = canonical_name(name)
    if name.startswith("patch_embed"):
        return decay ** (DEPTH + 1) * pe_mult
    if name.split(".")[0] in ("cls_token", "reg_token", "pos_embed", "mask_token"):
        return decay ** (DEPTH + 1)
    if name.startswith("blocks."):
        return decay ** (DEPTH - int(name.split(".")[1]))
    return 1.0


@pytest.mark.parametrize("spec", ["paper", "paper_lora"])
def test_param_groups_rules(spec: str) -> None:
    model = tiny(spec)
    cfg = OptimConfig(lr=1e-3, layer_decay=0.5, patch_embed_lr_mult=0.2)
    groups = param_groups(model, cfg, num_layers=DEPTH)
    got = by_name(groups)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(got) == sorted(names)
    for n in names:
        _, lr_scale, wd_scale = got[n]
        assert wd_scale == (1.0 if n.endswith(DECAYED_LEAVES) else 0.0), n
        assert lr_scale == pytest.approx(expected_lr_scale(n, 0.5, 0.2), rel=1e-12), n
    # exact values for the known decay 0.5 over 3 blocks
    assert got["patch_embed.proj.weight"][1] == pytest.approx(0.0625 * 0.2)
    assert got["pos_embed"][1:] == (0.0625, 0.0) and got["mask_token"][1:] == (0.0625, 0.0)
    assert got["blocks.0.attn.qkv.weight"][1:] == (0.125, 1.0)
    assert got["blocks.2.ls2.gamma"][1:] == (0.5, 0.0)
    assert got["norm.weight"][1:] == (1.0, 0.0)
    # every CLS twin sits in the very group of its shared parameter
    cls_names = [n for n in names if is_cls_param(n)]
    assert len(cls_names) == (4 * DEPTH + 2 * DEPTH + 2 + (3 if spec == "paper_lora" else 2))
    for n in cls_names:
        prefix, leaf = n.rsplit(".", 1)
        assert got[n][0] == got[f"{prefix}.{TWIN[leaf]}"][0], n
    # merged by (lr_scale, wd_scale): layer 0 tokens; patch_embed w/b; 3 blocks x (decay, no decay); final norm
    assert len(groups) == 1 + 2 + 2 * DEPTH + 1
    assert len({(g["lr_scale"], g["wd_scale"]) for g in groups}) == len(groups)


def test_param_groups_default_two_groups_and_frozen_skipped() -> None:
    model = tiny("paper")
    model.pos_embed.requires_grad_(False)
    groups = param_groups(model, OptimConfig(lr=1e-3), num_layers=DEPTH)
    assert [(g["name"], g["lr_scale"], g["wd_scale"]) for g in groups] == [("no_decay_lr1", 1.0, 0.0), ("decay_lr1", 1.0, 1.0)]
    assert "pos_embed" not in by_name(groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters())) - 1


class Wrapped(nn.Module):
    """A method module around the backbone, then DDP/compile-style wrappers around that."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.student = nn.Module()
        self.student.backbone = backbone
        self.student.dino_head = nn.Module()
        self.student.dino_head.mlp = nn.Sequential(nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(32, 10)


def test_param_groups_wrapped_names() -> None:
    outer = nn.Module()
    outer.module = nn.Module()
    outer.module._orig_mod = Wrapped(tiny("paper_lora"))
    cfg = OptimConfig(lr=1e-3, layer_decay=0.5, patch_embed_lr_mult=0.2)
    got = by_name(param_groups(outer, cfg, num_layers=DEPTH))
    prefix = "module._orig_mod.student.backbone."
    plain = by_name(param_groups(tiny("paper_lora"), cfg, num_layers=DEPTH))
    for n, (_, lr_scale, wd_scale) in plain.items():
        assert got[prefix + n][1:] == (lr_scale, wd_scale), n
    assert got["module._orig_mod.student.backbone.blocks.1.attn.qkv.weight"][1:] == (0.25, 1.0)
    assert got["module._orig_mod.student.dino_head.mlp.0.weight"][1:] == (1.0, 1.0)
    assert got["module._orig_mod.student.dino_head.mlp.2.bias"][1:] == (1.0, 0.0)
    assert got["module._orig_mod.head.weight"][1:] == (1.0, 1.0)
    assert canonical_name("module.blocks.0._checkpoint_wrapped_module.attn.qkv.weight") == "blocks.0.attn.qkv.weight"


def test_optim_config_validation_and_lr_scaling() -> None:
    with pytest.raises(ValueError, match=r"OptimConfig.name='sgd'"):
        OptimConfig(lr=1e-3, name="sgd")
    with pytest.raises(ValueError, match=r"OptimConfig.lr=-1"):
        OptimConfig(lr=-1)
    with pytest.raises(ValueError, match=r"layer_decay=1.5"):
        OptimConfig(lr=1e-3, layer_decay=1.5)
    with pytest.raises(ValueError, match=r"accum_steps=0"):
        OptimConfig(lr=1e-3, accum_steps=0)
    with pytest.raises(TypeError):
        OptimConfig()  # lr is required
    assert OptimConfig(lr=1e-3, betas=[0.9, 0.95]).betas == (0.9, 0.95)
    dino = OptimConfig(lr=2e-4, lr_scaling="sqrt", base_batch_size=1024)
    assert scaled_lr(dino, 2048) == pytest.approx(2e-4 * math.sqrt(2))
    deit = OptimConfig(lr=3e-3, lr_scaling="linear", base_batch_size=512)
    assert scaled_lr(deit, 2048) == pytest.approx(1.2e-2)
    assert scaled_lr(OptimConfig(lr=3e-3), 7) == 3e-3


def lamb_by_hand(p: list[float], grads: list[list[float]], lr: float, wd: float, b1: float, b2: float, eps: float,
                 adapt: bool, trust_clip: bool = False) -> list[float]:
    """Plain-Python LAMB, one element at a time."""
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        u = [(mi / (1 - b1**t)) / (math.sqrt(vi / (1 - b2**t)) + eps) + wd * pi for mi, vi, pi in zip(m, v, p)]
        trust = 1.0
        if adapt:
            wn, un = math.sqrt(sum(x * x for x in p)), math.sqrt(sum(x * x for x in u))
            trust = wn / un if wn > 0 and un > 0 else 1.0
            trust = min(trust, 1.0) if trust_clip else trust
        p = [pi - lr * trust * ui for pi, ui in zip(p, u)]
    return p


GRADS = [[0.1, 0.2, -0.3], [-0.05, 0.4, 0.1]]


@pytest.mark.parametrize("wd,always_adapt,trust_clip,p0", [
    (0.1, False, False, [1.0, -2.0, 3.0]),   # adapted (wd != 0); trust ratio ~ 3.5
    (0.1, False, True, [1.0, -2.0, 3.0]),    # trust clipped to 1
    (0.0, False, False, [1.0, -2.0, 3.0]),   # wd == 0: plain Adam step, no adaptation
    (0.0, True, False, [1.0, -2.0, 3.0]),    # always_adapt
    (0.1, False, False, [0.0, 0.0, 0.0]),    # ||p|| = 0 -> trust 1
])
def test_lamb_matches_hand_computation(wd, always_adapt, trust_clip, p0) -> None:
    lr, b1, b2, eps = 0.05, 0.9, 0.999, 1e-6
    p = nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = Lamb([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, always_adapt=always_adapt, trust_clip=trust_clip)
    for g in GRADS:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    adapt = wd != 0 or always_adapt
    want = lamb_by_hand(p0, GRADS, lr, wd, b1, b2, eps, adapt=adapt, trust_clip=trust_clip)
    assert p.tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
    if adapt and any(p0):  # not vacuous: the trust ratio (its clip) changed the result
        other = lamb_by_hand(p0, GRADS, lr, wd, b1, b2, eps, adapt=trust_clip, trust_clip=False)
        assert max(abs(x - y) for x, y in zip(want, other)) > 1e-3


def _dtensor_worker(rank: int, port: int, out_path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        torch.manual_seed(0)
        full = torch.randn(5, 3, dtype=torch.float64)  # 5 rows: uneven shards (3 + 2)
        grads = [torch.randn(5, 3, dtype=torch.float64) for _ in range(2)]
        p = nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        opt = Lamb([p], lr=0.05, weight_decay=0.1)
        for g in grads:
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
            opt.step()
        result = p.detach().full_tensor()
        if rank == 0:
            out = {"dtensor": result.clone()}
            ref = nn.Parameter(full.clone())
            ref_opt = Lamb([ref], lr=0.05, weight_decay=0.1)
            for g in grads:
                ref.grad = g.clone()
                ref_opt.step()
            out["plain"] = ref.detach().clone()
            out["state_is_dtensor"] = type(opt.state[p]["exp_avg"]).__name__
            torch.save(out, out_path)
    finally:
        dist.destroy_process_group()


def test_lamb_dtensor_shards_use_full_norms(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dtensor_worker, args=(port, str(tmp_path / "out.pt")), nprocs=2)
    out = torch.load(tmp_path / "out.pt")
    assert out["state_is_dtensor"] == "DTensor"
    torch.testing.assert_close(out["dtensor"], out["plain"], rtol=1e-12, atol=1e-14)


def test_build_optimizer_adamw_decays_only_decayed_group() -> None:
    model = tiny("paper")
    cfg = OptimConfig(lr=1e-3, weight_decay=0.5, layer_decay=0.5)
    groups = param_groups(model, cfg, num_layers=DEPTH)
    opt = build_optimizer(groups, cfg, lr_for_init=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.1 * g["lr_scale"])
        assert g["weight_decay"] == 0.5 * g["wd_scale"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's step is 0 for zero moments: only decoupled decay moves p
    opt.step()
    scales = by_name(groups)
    for n, p in model.named_parameters():
        _, lr_scale, wd_scale = scales[n]
        factor = 1 - 0.1 * lr_scale * 0.5 * wd_scale
        torch.testing.assert_close(p.detach(), before[n] * factor, rtol=1e-6, atol=0)
        assert (factor < 1) == n.endswith(DECAYED_LEAVES)
    assert opt.state_dict()["param_groups"][0]["param_names"] == groups[0]["param_names"]
    assert isinstance(build_optimizer(groups, OptimConfig(lr=1e-3, name="lamb")), Lamb)


def test_lamb_steps_every_tensor_as_if_alone() -> None:
    """The foreach step over a group is per-tensor LAMB: each tensor moves exactly as it would
    in an optimizer of its own (trust ratios per tensor, not per group)."""
    torch.manual_seed(0)
    shapes = [(5, 3), (7,), (2, 4, 3), (1,)]
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(3)]
    together = [nn.Parameter(t.clone()) for t in init]
    opt = Lamb([{"params": together[:2], "weight_decay": 0.1}, {"params": together[2:], "weight_decay": 0.0}], lr=0.05)
    for g in grads:
        for p, gi in zip(together, g):
            p.grad = gi.clone()
        opt.step()
    for i, t in enumerate(init):
        alone = nn.Parameter(t.clone())
        ref = Lamb([alone], lr=0.05, weight_decay=0.1 if i < 2 else 0.0)
        for g in grads:
            alone.grad = g[i].clone()
            ref.step()
        torch.testing.assert_close(together[i].detach(), alone.detach(), rtol=1e-12, atol=1e-14)


def test_adamw_kernels_follow_optim_implementation() -> None:
    groups = param_groups(tiny("paper"), OptimConfig(lr=1e-3), num_layers=DEPTH)
    auto = build_optimizer(groups, OptimConfig(lr=1e-3))
    assert auto.defaults["fused"]  # CPU tensors: torch has fused AdamW kernels for them
    foreach = build_optimizer(groups, OptimConfig(lr=1e-3, implementation="foreach")).defaults
    assert foreach["foreach"] and not foreach["fused"]
    assert build_optimizer(groups, OptimConfig(lr=1e-3, implementation="for_loop")).defaults["foreach"] is False
    with pytest.raises(ValueError, match="implementation='triton'"):
        OptimConfig(lr=1e-3, implementation="triton")
