"""FLOP/param accounting and tools/report.py."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from lspretrain.accounting import _routed_layer_norm_macs, _sdpa_macs, account, fvcore_forward_macs, report
from lspretrain.models import create_vit, specialize

ROOT = Path(__file__).resolve().parents[1]


def test_vit_small_reference_macs():
    # ViT-S/16 at 224 is ~4.60 G multiply-adds forward once SDPA is counted (timm's model under
    # fvcore with an SDPA handle: 4.25 G of linear layers + 0.35 G of attention matmuls).
    acc = account("vit_small_patch16", "none", (224,))
    f = acc.flops[224]
    assert f["forward_macs_fvcore"] / 1e9 == pytest.approx(4.60, abs=0.01)
    assert f["cross_check_ok"]
    # Training = forward + backward ≈ 3 × forward for a ViT (the patch conv needs no input grad).
    assert 2.95 < f["train_flops_per_image"] / f["forward_flops_flop_counter"] < 3.0


def test_part_by_part_count_equals_whole_model_trace():
    torch.manual_seed(0)
    model = create_vit("vit_tiny_patch16", embed_dim=48, depth=2, num_heads=3, img_size=32, num_registers=1, layerscale_init=0.1)
    model = specialize(model, "paper").eval()
    x = torch.randn(2, 3, 48, 48)
    whole = FlopCountAnalysis(model, x).set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
    whole.set_op_handle("prim::PythonOp.RoutedLayerNormFunction", _routed_layer_norm_macs)
    whole.unsupported_ops_warnings(False)
    logging.getLogger("fvcore.nn.jit_analysis").setLevel(logging.ERROR)
    parts = fvcore_forward_macs(model, 48, batch=2)
    assert parts["total"] == whole.total()
    assert parts["per_part"]["blocks.0"] == whole.by_module()["blocks.0"]


def test_vit_large_paper_report_numbers():
    rep = report("vit_large_patch14", "paper", (224, 98), compare="none")
    assert rep["params"]["total"] == 303_228_928 + 25_339_904
    assert rep["params"]["extra"] == {"norm": 100_352, "qkv": 25_190_400, "layerscale": 49_152, "lora": 0}
    assert rep["delta"]["forward_macs"] == {"224": 0, "98": 0}
    assert rep["compare"]["params"]["total"] == 303_228_928
    assert [b["block"] for b in rep["blocks"] if "attn.qkv" in b["specialized"]] == list(range(8))
    assert rep["blocks"][8]["extra_params"] == 2 * 2048 + 2 * 1024  # norms + LayerScales
    for res in rep["resolutions"].values():
        assert res["cross_check_ok"]
    # ViT-L/14 at 224: 24 blocks of 257 tokens; DeiT-III's ViT-L/16 table says ~61.6 G at 197 tokens.
    assert rep["resolutions"]["224"]["forward_macs"] / 1e9 == pytest.approx(81.08, abs=0.05)


def test_vit_giant_is_counted_without_its_memory():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    acc = account("vit_giant_patch14", "paper", (224,))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert acc.params["total"] > 1.1e9
    assert grown_mib < 1024  # fp32 weights alone would be 4.9 GB
    assert acc.flops[224]["cross_check_ok"]


def run_report(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), *args], capture_output=True, text=True, timeout=300)


def test_report_cli_json_and_markdown(tmp_path):
    out = run_report("--arch", "vit_small_patch16", "--spec", "paper_lora", "--compare", "none", "--img-size", "64", "32",
                     "--set", "layerscale_init=1e-4", "--format", "json")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert set(rep) >= {"arch", "spec", "spec_config", "vit_config", "params", "resolutions", "blocks", "compare", "delta"}
    assert rep["vit_config"]["layerscale_init"] == 1e-4
    assert rep["params"]["extra"]["lora"] == 4 * (32 * (384 + 3 * 384) + 3 * 384)
    assert rep["delta"]["forward_macs"] == {"64": 0, "32": 0}  # LoRA counted in its merged inference form
    md = run_report("--arch", "vit_small_patch14", "--spec", "norm_ls", "--out", str(tmp_path / "r.md"))
    assert md.returncode == 0, md.stderr
    text = (tmp_path / "r.md").read_text()
    assert "| params (total) | 21,629,184 |" not in text  # specialized, so more than the plain count
    assert "extra: norm | 19,200" in text and "## Per block" in text


@pytest.mark.parametrize(
    "args,message",
    [
        (["--spec", "papr"], "unknown specialization preset 'papr'"),
        (["--arch", "vit_small_patch16", "--spec", "paper", "--img-size", "100", "--set", "layerscale_init=1e-4"],
         "img_size=100 is not divisible by the patch size 16"),
        (["--arch", "vit_small_patch16", "--spec", "paper"], "the model has none (layerscale_init=None)"),
        (["--arch", "vit_small_patch14", "--set", "qkv_bais=false"], "unknown ViT config key 'qkv_bais'"),
    ],
)
def test_report_cli_errors(args, message):
    out = run_report(*args)
    assert out.returncode == 2
    assert message in out.stderr
