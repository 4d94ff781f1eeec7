"""The reverse direction (a released plain checkpoint -> our specialized ViT, for init_from)
and the torch.hub entrypoints in hubconf.py."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lspretrain.convert import Backbone, load_backbone, read_released, write
from lspretrain.models import build_backbone, create_vit, is_cls_param

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(embed_dim=48, depth=3, num_heads=3, img_size=28, layerscale_init=0.1, mask_token=True, num_registers=2)


def released(tmp_path, fmt):
    """A plain DINOv2-flavour model and its release in ``fmt`` (bare .pth for timm/dinov2)."""
    torch.manual_seed(0)
    model = create_vit("vit_tiny_patch14", **CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path / ({"hf": "hf"}.get(fmt, f"{fmt}.pth"))
    bb = Backbone.from_model(model)
    if fmt == "timm":  # timm has no mask token
        bb.state_dict.pop("mask_token")
        bb.vit["mask_token"] = False
    write(bb, fmt, path)
    return model, path


@pytest.mark.parametrize("fmt", ["dinov2", "hf", "timm"])
@pytest.mark.parametrize("spec", ["paper", "paper_lora"])
def test_import_then_specialize_keeps_outputs(tmp_path, fmt, spec):
    plain, path = released(tmp_path, fmt)
    out = tmp_path / "init.pt"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), str(path), "--from", fmt,
                           "--spec", spec, "--num-heads", "3", "--to", "torch", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"specialized with preset '{spec}'" in done.stdout
    bb = load_backbone(out)
    assert bb.spec["qkv"] == "first_third" and bb.spec["lora_rank"] == (32 if spec == "paper_lora" else 0)
    n_cls = sum(is_cls_param(k) for k in bb.state_dict)
    assert n_cls == 3 * 2 * 2 + 3 * 2 + 2 + (3 if spec == "paper_lora" else 2)  # norms, ls, final norm, qkv
    model = bb.build()
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = plain.forward_features(x), model.forward_features(x)
    for k in ("cls_norm", "patches_norm", "registers_norm"):
        assert (got[k] - want[k]).abs().max() < 2e-6, k
    # What a recipe's init_from does: the state dict loads strictly into the recipe's model.
    recipe_model = build_backbone("vit_tiny_patch14", spec, **{**CFG, "mask_token": fmt != "timm",
                                                               "pos_embed_cls": fmt != "timm"})
    recipe_model.load_state_dict(bb.state_dict, strict=True)


def test_hub_entrypoints(tmp_path):
    plain, path = released(tmp_path, "dinov2")
    bb = read_released(path, "dinov2", spec="paper_lora", num_heads=3)
    with torch.no_grad():  # a trained LoRA delta, so that merging has something to merge
        for k, v in bb.state_dict.items():
            if k.endswith("cls_lora_b"):
                v.normal_(0, 0.05)
    write(bb, "safetensors", tmp_path / "s.safetensors")
    model = torch.hub.load(str(ROOT), "backbone", source="local", weights=str(tmp_path / "s.safetensors"))
    merged = torch.hub.load(str(ROOT), "backbone", source="local", weights=str(tmp_path / "s.safetensors"), merge_lora=True)
    by_arch = torch.hub.load(str(ROOT), "vit_tiny_patch14", source="local", weights=str(tmp_path / "s.safetensors"),
                             spec="paper_lora", **CFG)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = bb.build()(x)
        assert torch.equal(model(x), ref) and torch.equal(by_arch(x), ref)
        assert (merged(x) - ref).abs().max() < 1e-5
        assert (ref - plain(x)).abs().max() > 1e-4  # the delta mattered
    assert merged.specialization.lora_rank == 0 and model.specialization.lora_rank == 32
    with pytest.raises(ValueError, match="use the 'backbone' entrypoint"):
        torch.hub.load(str(ROOT), "vit_tiny_patch14", source="local", weights=str(tmp_path / "s.safetensors"),
                       spec="paper", **CFG)
