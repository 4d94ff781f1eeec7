"""Layer specialization (arXiv 2602.08626): exactness at conversion, gradient routing, FLOP
equality, the parameters each preset adds to ViT-L/14 (counted by hand below), compile /
checkpointing / autocast / FSDP2, and bad input."""
import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.checkpoint import checkpoint

from lspretrain.accounting import flop_counter_flops, fvcore_forward_macs
from lspretrain.models import (
    PRESETS,
    RoutedLayerNorm,
    RoutedLayerScale,
    RoutedLinear,
    SpecializationSpec,
    build_backbone,
    create_vit,
    get_spec,
    is_cls_param,
    merge_lora,
    specialize,
)
from lspretrain.models.specialize import shared_twin, spec_from_state_dict
from lspretrain.models.vit import LayerScale

TINY = dict(embed_dim=48, depth=3, num_heads=3, img_size=32, num_registers=2, layerscale_init=0.1, mask_token=True)


def tiny_plain(seed=0, **kw):
    torch.manual_seed(seed)
    return create_vit("vit_tiny_patch16", **{**TINY, **kw}).eval()


def randomize_cls_params(model, seed=1):
    """Move the CLS copies away from the shared weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_cls_param(name):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def outputs_and_grads(module, fn, x):
    """``fn(x)`` (``module`` or a compiled form of it), then the gradients of mean(out²) with
    respect to ``x`` and to each of ``module``'s parameters."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    out = fn(x)
    out.square().mean().backward()
    return out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in module.named_parameters()}


def all_outputs(model, x):
    return model.forward_features(x)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("registers_with", ["patches", "cls"])
def test_conversion_keeps_outputs(preset, registers_with):
    plain = tiny_plain()
    spec = get_spec(preset, registers_with=registers_with)
    special = specialize(copy.deepcopy(plain), spec)
    x = torch.randn(2, 3, 32, 32)
    ref, out = all_outputs(plain, x), all_outputs(special, x)
    assert out["cls_norm"].shape == (2, 48) and out["patches_norm"].shape == (2, 4, 48)
    assert out["registers_norm"].shape == (2, 2, 48)
    for key in ref:
        if spec.qkv == "none" or spec.lora_rank:
            # Norms, LayerScale and the LoRA path compute the very same arithmetic: bit-exact.
            assert torch.equal(ref[key], out[key]), key
        else:
            # A full CLS qkv runs the CLS rows and the patch rows as two GEMMs, whose blocking
            # differs from one GEMM over all rows: equal up to float rounding of the reduction.
            torch.testing.assert_close(ref[key], out[key], rtol=0, atol=2e-6)


def test_conversion_is_exact_in_float64():
    plain = tiny_plain().double()
    special = specialize(copy.deepcopy(plain), "paper")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(plain(x), special(x), rtol=0, atol=1e-13)


def test_specializing_a_trained_state_dict():
    trained = tiny_plain(seed=3)
    fresh = tiny_plain(seed=4)
    fresh.load_state_dict(trained.state_dict())
    special = specialize(fresh, "paper_lora")
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(trained(x), special(x))
    # The shared parameters are the plain model's own Parameter objects, under the same names.
    plain_keys = set(trained.state_dict())
    assert plain_keys <= set(special.state_dict())
    assert all(is_cls_param(k) for k in set(special.state_dict()) - plain_keys)


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "none"])
def test_cls_params_are_exactly_the_added_ones_and_name_their_shared_twin(preset):
    plain_keys = set(tiny_plain().state_dict())
    special = specialize(tiny_plain(), preset)
    for name in special.state_dict():
        assert is_cls_param(name) == (name not in plain_keys), name
        if is_cls_param(name):
            assert shared_twin(name) in plain_keys and shared_twin(name).rpartition(".")[0] == name.rpartition(".")[0]
        else:
            assert shared_twin(name) == name
    # The CLS *token* is every ViT's own, not a twin of anything, wherever it sits.
    assert not is_cls_param("cls_token") and not is_cls_param("backbone.cls_token")
    assert not is_cls_param("student.backbone.cls_token")
    # The preset comes back from the state dict's keys alone (block selections resolved).
    inferred, spec, depth = spec_from_state_dict(special.state_dict(), TINY["depth"]), get_spec(preset), TINY["depth"]
    for field in ("norm", "qkv", "layerscale"):
        assert inferred.blocks(field, depth) == spec.blocks(field, depth), field
    assert (inferred.final_norm, inferred.lora_rank) == (spec.final_norm, spec.lora_rank)


def test_cls_params_take_effect():
    plain = tiny_plain()
    special = randomize_cls_params(specialize(copy.deepcopy(plain), "paper"))
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(plain(x), special(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda: RoutedLayerNorm(torch.nn.LayerNorm(16), num_cls=2),
        lambda: RoutedLayerScale(LayerScale(16, 0.5), num_cls=2),
        lambda: RoutedLinear(torch.nn.Linear(16, 24), num_cls=2),
    ],
    ids=["norm", "layerscale", "qkv"],
)
def test_gradients_reach_cls_params_only_from_cls_rows(make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(3, 7, 16)
    out_dim = layer(x).shape[-1]

    def grads(rows):
        layer.zero_grad(set_to_none=False)
        g = torch.zeros(3, 7, out_dim)
        g[:, rows] = torch.randn(3, len(range(7)[rows]), out_dim)
        layer(x).backward(g)
        return {n: p.grad.clone() for n, p in layer.named_parameters()}

    patch_only = grads(slice(2, None))
    cls_only = grads(slice(0, 2))
    for name in patch_only:
        if is_cls_param(name):
            assert torch.count_nonzero(patch_only[name]) == 0, name
            assert torch.count_nonzero(cls_only[name]) > 0, name
        else:
            # The routed LayerNorm moves the CLS rows' share out of the shared affine gradient
            # by a subtraction: zero up to float rounding of the sum.
            assert cls_only[name].abs().max() <= 1e-5 * patch_only[name].abs().max(), name
            assert torch.count_nonzero(patch_only[name]) > 0, name


def test_lora_gradients_and_merge():
    torch.manual_seed(0)
    layer = RoutedLinear(torch.nn.Linear(16, 24), num_cls=1, lora_rank=4)
    x = torch.randn(2, 5, 16)
    layer(x)[:, 1:].sum().backward()  # patch rows only: the low-rank delta gets no gradient
    assert layer.cls_lora_b.grad is None or torch.count_nonzero(layer.cls_lora_b.grad) == 0
    layer.zero_grad()
    layer(x)[:, :1].sum().backward()
    assert torch.count_nonzero(layer.cls_lora_b.grad) > 0  # B = 0 at init, A random: B learns first
    # After "training", merging gives a full CLS matrix computing the same function.
    model = randomize_cls_params(specialize(tiny_plain().double(), "paper_lora"))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = model(x)
    merged = merge_lora(model)
    assert merged.specialization.lora_rank == 0
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(before, merged(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("img_size", [32, 64])
@pytest.mark.parametrize("preset", ["norm", "norm_ls", "paper", "paper_lora"])
def test_forward_flops_equal_plain(preset, img_size):
    plain = tiny_plain()
    special = specialize(copy.deepcopy(plain), preset)
    if special.specialization.lora_rank:
        special = merge_lora(special)  # the inference form
    for batch in (1, 3):
        ref = fvcore_forward_macs(plain, img_size, batch)
        got = fvcore_forward_macs(special, img_size, batch)
        assert got["total"] == ref["total"]
        for op in ("linear", "conv", "scaled_dot_product_attention"):
            assert got["by_operator"][op] == ref["by_operator"][op], op
        routed_norms = got["by_operator"].get("PythonOp.RoutedLayerNormFunction", 0)
        assert got["by_operator"].get("layer_norm", 0) + routed_norms == ref["by_operator"]["layer_norm"]
        assert flop_counter_flops(special, img_size, batch) == flop_counter_flops(plain, img_size, batch)
    # and the backward too (training FLOPs)
    assert flop_counter_flops(special.train(), img_size, 2, backward=True) == flop_counter_flops(plain.train(), img_size, 2, backward=True)


def test_vit_large_parameter_arithmetic():
    with torch.device("meta"):
        plain = create_vit("vit_large_patch14")
        base = sum(p.numel() for p in plain.parameters())

        def extra(preset):
            m = specialize(copy.deepcopy(plain), preset)
            return {
                k: sum(p.numel() for n, p in m.named_parameters() if is_cls_param(n) and sel(n))
                for k, sel in {
                    "qkv": lambda n: ".qkv.cls_weight" in n or ".qkv.cls_bias" in n,
                    "norm_ls": lambda n: "norm" in n or "cls_gamma" in n,
                    "lora": lambda n: "lora" in n or "bias_delta" in n,
                    "all": lambda n: True,
                }.items()
            }

        paper = extra("paper")
        lora = extra("paper_lora")
    assert [i for i, b in enumerate(specialize(copy.deepcopy(plain), "paper").blocks) if isinstance(b.attn.qkv, RoutedLinear)] == list(range(8))
    assert paper["qkv"] == 25_190_400  # 8 blocks x 3,148,800
    assert paper["norm_ls"] == 24 * (4096 + 2048) + 2048  # ≈149.5 k
    assert paper["norm_ls"] / base < 0.001
    assert lora["lora"] == 8 * (32 * (1024 + 3072) + 3072)
    assert lora["all"] / base < 0.01


def test_bad_spec_inputs_name_the_value():
    with pytest.raises(ValueError, match="unknown specialization preset 'papr'.*paper"):
        get_spec("papr")
    with pytest.raises(ValueError, match="block index 24 is out of range for a model of depth 24"):
        with torch.device("meta"):
            specialize(create_vit("vit_large_patch14"), SpecializationSpec(qkv=(0, 24)))
    with pytest.raises(ValueError, match="lora_rank=-1"):
        get_spec("paper", lora_rank=-1)
    with pytest.raises(ValueError, match="lora_rank=64 exceeds the model width 48"):
        specialize(tiny_plain(), get_spec("paper", lora_rank=64))
    with pytest.raises(ValueError, match="spec specializes LayerScale but the model has none"):
        specialize(tiny_plain(layerscale_init=None), "paper")
    with pytest.raises(ValueError, match="unknown specialization keys \\['qvk'\\]"):
        get_spec({"qvk": "all"})
    with pytest.raises(ValueError, match="already specialized"):
        specialize(specialize(tiny_plain(), "norm"), "paper")


def test_torch_compile_matches_eager():
    model = randomize_cls_params(specialize(tiny_plain(), "paper_lora"))
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["paper", "paper_lora"])
def test_traced_routed_forms_match_the_eager_function(preset):
    """Under torch.compile the routed LayerNorm / LayerScale take their traced form (one fused
    expression each): same values and gradients as the eager Function, and one graph per block
    (AOTAutograd tracing only, no code generation: seconds)."""
    model = randomize_cls_params(specialize(tiny_plain(), preset)).train()
    blk = model.blocks[0]
    x = torch.randn(2, 7, 48, requires_grad=True)
    explained = torch._dynamo.explain(blk)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    torch._dynamo.reset()

    (y0, dx0, g0), (y1, dx1, g1) = (outputs_and_grads(blk, fn, x) for fn in (blk, torch.compile(blk, backend="aot_eager")))
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-7)
    assert any(is_cls_param(n) for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = randomize_cls_params(specialize(tiny_plain(), "paper")).train()
    x = torch.randn(2, 3, 32, 32)

    def run(use_ckpt):
        model.zero_grad()
        t = model.prepare_tokens(x)
        for blk in model.blocks:
            t = checkpoint(blk, t, use_reentrant=False) if use_ckpt else blk(t)
        model.norm(t)[:, 0].square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_grads, ckpt_grads = run(False), run(True)
    assert plain_grads.keys() == ckpt_grads.keys()
    for n in plain_grads:
        torch.testing.assert_close(plain_grads[n], ckpt_grads[n])


def test_bf16_autocast():
    model = randomize_cls_params(specialize(tiny_plain(), "paper"))
    x = torch.randn(2, 3, 32, 32)
    seen = []
    model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_features(x)
    assert seen == [torch.bfloat16]  # the routed qkv ran in bf16 (norms stay fp32 under autocast)
    torch.testing.assert_close(out["cls_norm"].float(), model(x), rtol=0.05, atol=0.05)


# -- FSDP2 over gloo, 2 processes ------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp2_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = randomize_cls_params(specialize(tiny_plain(), "paper_lora")).train()
        for blk in model.blocks:
            fully_shard(blk)
        fully_shard(model)
        torch.manual_seed(100 + rank)  # each rank its own half of the batch
        x = torch.randn(2, 3, 32, 32)
        loss = model(x).square().mean()
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        dist.all_reduce(loss)
        if rank == 0:
            torch.save({"loss": loss / world, "grads": grads}, os.path.join(out_dir, "fsdp.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_ranks_matches_unsharded(tmp_path):
    mp.spawn(_fsdp2_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    model = randomize_cls_params(specialize(tiny_plain(), "paper_lora")).train()
    xs = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        xs.append(torch.randn(2, 3, 32, 32))
    losses = [model(x).square().mean() for x in xs]
    loss = sum(losses) / 2
    loss.backward()
    torch.testing.assert_close(sharded["loss"], loss.detach())
    grads = dict(model.named_parameters())
    assert any(is_cls_param(n) for n in sharded["grads"])
    for n, g in sharded["grads"].items():
        torch.testing.assert_close(g, grads[n].grad, rtol=1e-4, atol=1e-6)


def test_build_backbone_presets():
    for preset in PRESETS:
        m = build_backbone("vit_tiny_patch16", preset, **TINY)
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 48)
