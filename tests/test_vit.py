"""The plain ViT family: reference parameter counts, outputs, positional embedding, errors."""
import pytest
import torch

from lspretrain.models import VisionTransformer, create_vit, vit_config


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def meta_vit(arch, **kw):
    with torch.device("meta"):
        return create_vit(arch, **kw)


# The backbones' counts in the public code: timm's vit_{small,base,large}_patch16_224 without their
# 1000-class head (22,050,664 - 385,000 for ViT-S), DeiT-III's (github.com/facebookresearch/deit,
# models_v2.py) and dinov2's vit_large at patch 14 (github.com/facebookresearch/dinov2).
@pytest.mark.parametrize(
    "arch,overrides,expected",
    [
        ("vit_small_patch16", {}, 21_665_664),
        ("vit_base_patch16", {}, 85_798_656),
        ("vit_large_patch16", {}, 303_301_632),
        ("vit_large_patch16", {"layerscale_init": 1e-4}, 303_350_784),
        ("vit_large_patch16", {"layerscale_init": 1e-4, "pos_embed_cls": False}, 303_349_760),  # DeiT-III
        ("vit_large_patch14", {}, 303_228_928),  # DINOv2: LayerScale + mask token
        ("vit_large_patch14", {"img_size": 518}, 304_368_640),  # the released DINOv2 models
        ("vit_small_patch14", {}, 21_629_184),
    ],
)
def test_reference_parameter_counts(arch, overrides, expected):
    assert n_params(meta_vit(arch, **overrides)) == expected


def test_deit3_large_with_classifier_head():
    backbone = meta_vit("vit_large_patch16", layerscale_init=1e-4, pos_embed_cls=False)
    head = 1024 * 1000 + 1000
    assert n_params(backbone) + head == 304_374_760


def test_giant_uses_dinov2_swiglu_width():
    g = meta_vit("vit_giant_patch14")
    assert g.blocks[0].mlp.w12.out_features == 2 * 4096
    assert len(g.blocks) == 40 and g.embed_dim == 1536


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return create_vit("vit_tiny_patch16", embed_dim=48, depth=3, num_heads=3, img_size=32, num_registers=2,
                      layerscale_init=1e-2, mask_token=True).eval()


def test_forward_features_outputs(tiny):
    out = tiny.forward_features(torch.randn(2, 3, 32, 32))
    assert out["cls_norm"].shape == (2, 48)
    assert out["registers_norm"].shape == (2, 2, 48)
    assert out["patches_norm"].shape == (2, 4, 48)
    assert out["prenorm"].shape == (2, 1 + 2 + 4, 48)
    torch.testing.assert_close(tiny(torch.zeros(1, 3, 32, 32)), tiny.forward_features(torch.zeros(1, 3, 32, 32))["cls_norm"])


def test_positional_embedding_interpolation(tiny):
    # At the stored resolution the embedding is the stored tensor itself, exactly.
    assert torch.equal(tiny.interpolate_pos_embed(2, 2), tiny.pos_embed)
    # Any other resolution (also non-square) gets a bicubic resize of the patch grid.
    out = tiny.forward_features(torch.randn(1, 3, 64, 48))
    assert out["patches_norm"].shape == (1, 4 * 3, 48)
    pos = tiny.interpolate_pos_embed(4, 3)
    assert pos.shape == (1, 1 + 12, 48)
    assert torch.equal(pos[:, :1], tiny.pos_embed[:, :1])  # the CLS position is never resized


def test_patch_only_positions_deit3():
    m = create_vit("vit_tiny_patch16", embed_dim=32, depth=1, num_heads=2, img_size=32, pos_embed_cls=False)
    assert m.pos_embed.shape == (1, 4, 32)
    tokens = m.prepare_tokens(torch.randn(1, 3, 32, 32))
    assert torch.equal(tokens[:, 0], m.cls_token[:, 0])  # CLS is concatenated after the positions


def test_masked_patches_become_the_mask_token(tiny):
    x = torch.randn(1, 3, 32, 32)
    masks = torch.tensor([[True, False, False, True]])
    tokens = tiny.prepare_tokens(x, masks)
    pos = tiny.interpolate_pos_embed(2, 2)
    patches = tokens[:, 3:]  # after CLS and 2 registers
    torch.testing.assert_close(patches[0, 0], tiny.mask_token[0] + pos[0, 1])
    torch.testing.assert_close(patches[0, 3], tiny.mask_token[0] + pos[0, 4])
    unmasked = tiny.prepare_tokens(x)
    assert torch.equal(patches[0, 1], unmasked[0, 4])


def test_intermediate_layers(tiny):
    x = torch.randn(2, 3, 32, 32)
    outs = tiny.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
    assert len(outs) == 2
    patches, cls = outs[-1]
    assert patches.shape == (2, 48, 2, 2) and cls.shape == (2, 48)
    last = tiny.forward_features(x)
    torch.testing.assert_close(cls, last["cls_norm"])
    by_index = tiny.get_intermediate_layers(x, n=[0, 2])
    torch.testing.assert_close(by_index[1], last["patches_norm"])
    with pytest.raises(ValueError, match="block index 7 out of range"):
        tiny.get_intermediate_layers(x, n=[7])


def test_drop_path_is_stochastic_in_training_only():
    m = create_vit("vit_tiny_patch16", embed_dim=32, depth=2, num_heads=2, img_size=32, drop_path_rate=0.5,
                   drop_path_uniform=True)
    assert [b.drop_path.p for b in m.blocks] == [0.5, 0.5]
    ramp = create_vit("vit_tiny_patch16", embed_dim=32, depth=3, num_heads=2, img_size=32, drop_path_rate=0.4)
    assert [getattr(b.drop_path, "p", 0.0) for b in ramp.blocks] == pytest.approx([0.0, 0.2, 0.4])
    x = torch.randn(8, 3, 32, 32)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    assert not torch.equal(a, m(x))


def test_swiglu_forward():
    m = create_vit("vit_tiny_patch16", embed_dim=32, depth=1, num_heads=2, img_size=32, ffn="swiglu")
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="img_size=100 is not divisible by patch_size=16"):
        vit_config("vit_small_patch16", img_size=100)
    with pytest.raises(ValueError, match="image size 40x40 is not divisible by the patch size 16"):
        create_vit("vit_tiny_patch16", depth=1, img_size=32)(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="unknown arch 'vit_smal_patch16'.*vit_small_patch16"):
        create_vit("vit_smal_patch16")
    with pytest.raises(ValueError, match="unknown ViT config key 'layer_scale_init'.*layerscale_init"):
        create_vit("vit_small_patch16", layer_scale_init=1e-5)
    with pytest.raises(ValueError, match="masks given but the model was built with mask_token=False"):
        create_vit("vit_tiny_patch16", depth=1, img_size=32).prepare_tokens(torch.randn(1, 3, 32, 32), torch.zeros(1, 4, dtype=torch.bool))


def test_constructors_exist_per_size():
    from lspretrain.models import vit

    m = vit.vit_small_patch14(depth=1)
    assert isinstance(m, VisionTransformer) and m.cfg.patch_size == 14 and m.cfg.layerscale_init == 1e-5


def test_resolution_change_192_to_224():
    """DeiT-III: pretrain at 192 px, fine-tune at 224 px from that checkpoint."""
    torch.manual_seed(0)
    kw = dict(embed_dim=32, depth=2, num_heads=2, layerscale_init=1e-4, pos_embed_cls=False)
    pre = create_vit("vit_tiny_patch16", img_size=192, **kw).eval()
    fine = create_vit("vit_tiny_patch16", img_size=224, **kw).eval()
    fine.load_state_dict(pre.state_dict())
    assert fine.pos_embed.shape == (1, 14 * 14, 32)
    # At the source resolution nothing is resampled: the stored tensor itself.
    assert torch.equal(pre.interpolate_pos_embed(12, 12), pre.pos_embed)
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(fine(x), pre(x), rtol=1e-4, atol=1e-4)  # pre resamples on the fly: same op
    with pytest.raises(ValueError, match="not a square grid"):
        fine.load_state_dict({**pre.state_dict(), "pos_embed": torch.zeros(1, 143, 32)})
