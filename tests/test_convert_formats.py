"""Export formats: exact round trips (torch, safetensors, timm, dinov2, hf), transformers and
onnxruntime against our forward, refusals of layouts that cannot hold the CLS path, and
pickles carrying code never executed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lspretrain.convert import Backbone, ConversionError, load_backbone, read_released, read_source, write
from lspretrain.models import create_vit, get_spec, is_cls_param, specialize

ROOT = Path(__file__).resolve().parents[1]
# Flavours: DINOv2 (LayerScale, mask token, CLS position, registers, optionally SwiGLU) and
# DeiT-III (no LayerScale, patch-only positions, no mask token).
DINO = dict(embed_dim=48, depth=3, num_heads=3, img_size=28, layerscale_init=0.1, mask_token=True)
FLAVOURS = {
    "dinov2": ("vit_tiny_patch14", DINO),
    "dinov2_reg_swiglu": ("vit_tiny_patch14", dict(DINO, num_registers=2, ffn="swiglu")),
    "deit3": ("vit_tiny_patch16", dict(embed_dim=32, depth=2, num_heads=2, img_size=32, pos_embed_cls=False)),
}


def plain(flavour="dinov2", seed=0, **kw):
    arch, cfg = FLAVOURS[flavour]
    torch.manual_seed(seed)
    model = create_vit(arch, **{**cfg, **kw}).eval()
    with torch.no_grad():  # non-trivial values everywhere (zero-init tokens would hide mix-ups)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def specialized(preset="paper_lora", registers_with="patches", moved=True, **kw):
    model = specialize(plain("dinov2", num_registers=2, **kw), get_spec(preset, registers_with=registers_with))
    if moved:  # as training would: the CLS path no longer equals the shared one
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if is_cls_param(name):
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def images(model, n=3, seed=5):
    cfg = model.cfg
    return torch.randn(n, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(seed))


def assert_same_weights(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def same_outputs(m1, m2, x):
    with torch.no_grad():
        o1, o2 = m1.forward_features(x), m2.forward_features(x)
    return max((o1[k] - o2[k]).abs().max().item() for k in ("cls_norm", "patches_norm", "registers_norm", "prenorm")
               if o1[k].numel())


# -- our formats ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,name", [("torch", "b.pt"), ("safetensors", "b.safetensors")])
def test_native_round_trip_keeps_specialized_model(tmp_path, fmt, name):
    model = specialized("paper_lora", registers_with="cls")
    bb = Backbone.from_model(model)
    summary = write(bb, fmt, tmp_path / name)
    assert summary.keys == len(model.state_dict()) and summary.params == sum(v.numel() for v in model.state_dict().values())
    assert summary.dtypes == ["float32"] and summary.bytes == (tmp_path / name).stat().st_size
    if fmt == "torch":  # the file itself is weights-only loadable, config alongside
        raw = torch.load(tmp_path / name, weights_only=True)
        assert raw["vit"] == model.cfg.to_dict() and raw["spec"]["registers_with"] == "cls"
    back = load_backbone(tmp_path / name)
    assert back.vit == bb.vit and back.spec == bb.spec == model.specialization.to_dict()
    assert_same_weights(back.state_dict, bb.state_dict)
    assert same_outputs(back.build(), model, images(model)) == 0.0


def test_bf16_output(tmp_path):
    bb = Backbone.from_model(specialized())
    summary = write(bb, "safetensors", tmp_path / "b.safetensors", dtype="bf16")
    assert summary.dtypes == ["bfloat16"]
    back = load_backbone(tmp_path / "b.safetensors")
    for k, v in bb.state_dict.items():
        assert torch.equal(back.state_dict[k], v.to(torch.bfloat16)), k
    assert summary.bytes < sum(v.numel() for v in bb.state_dict.values()) * 2 + 20_000


# -- external layouts, plain models -----------------------------------------------------
EXACT_CASES = [  # (format, flavour, file name): layouts that hold every tensor as is
    ("timm", "deit3", "t.safetensors"),
    ("timm", "dinov2_reg_swiglu", "t.pth"),
    ("dinov2", "dinov2", "d.pth"),
    ("dinov2", "dinov2_reg_swiglu", "d.safetensors"),
    ("hf", "dinov2", "hf"),
    ("hf", "dinov2_reg_swiglu", "hf"),
]


@pytest.mark.parametrize("fmt,flavour,name", EXACT_CASES)
def test_plain_round_trip(tmp_path, fmt, flavour, name):
    kw = {"mask_token": False} if fmt == "timm" and flavour != "deit3" else {}  # timm has none
    model = plain(flavour, **kw)
    bb = Backbone.from_model(model)
    write(bb, fmt, tmp_path / name)
    # A bare .pth has no metadata: the head count is given, as --num-heads would.
    back = read_released(tmp_path / name, fmt, num_heads=model.cfg.num_heads)
    rebuilt = back.build()
    x = images(model)
    assert same_outputs(rebuilt, model, x) == 0.0
    if fmt == "timm" and model.cfg.num_registers:
        # timm's register layout folds the CLS position into cls_token: same function, and
        # every other tensor is untouched.
        assert back.vit["pos_embed_cls"] is False
        assert torch.equal(back.state_dict["cls_token"], bb.state_dict["cls_token"] + bb.state_dict["pos_embed"][:, :1])
        assert torch.equal(back.state_dict["pos_embed"], bb.state_dict["pos_embed"][:, 1:])
        rest = [k for k in bb.state_dict if k not in ("cls_token", "pos_embed")]
        assert_same_weights({k: back.state_dict[k] for k in rest}, {k: bb.state_dict[k] for k in rest})
    else:
        assert_same_weights(back.state_dict, bb.state_dict)
        assert back.vit == {**bb.vit, "layerscale_init": back.vit["layerscale_init"]}


def test_chain_torch_safetensors_timm_dinov2_hf(tmp_path):
    """torch -> safetensors -> timm -> ours -> dinov2 -> ours -> hf -> ours: every hop exact."""
    model = plain("dinov2", mask_token=False)
    write(Backbone.from_model(model), "torch", tmp_path / "a.pt")
    write(read_source(tmp_path / "a.pt"), "safetensors", tmp_path / "a.safetensors")
    write(read_source(tmp_path / "a.safetensors"), "timm", tmp_path / "t.safetensors")
    write(read_released(tmp_path / "t.safetensors", "timm"), "dinov2", tmp_path / "d.safetensors")
    d = read_released(tmp_path / "d.safetensors", "dinov2")
    d.state_dict.pop("mask_token")  # dinov2 adds a zero one; ours had none
    d.vit["mask_token"] = False
    write(d, "hf", tmp_path / "hf")
    final = read_released(tmp_path / "hf", "hf")
    final.state_dict.pop("mask_token")
    assert_same_weights(final.state_dict, model.state_dict())


def test_deit_layout_gains_only_neutral_tensors(tmp_path):
    """HF always has a CLS position, a mask token and LayerScale: a DeiT-III model gets a zero
    position, a zero mask token and gammas of one, named in the summary, same outputs."""
    model = plain("deit3")
    summary = write(Backbone.from_model(model), "hf", tmp_path / "hf")
    assert len(summary.notes) == 3 and any("LayerScale" in n for n in summary.notes)
    back = read_released(tmp_path / "hf", "hf")
    assert torch.equal(back.state_dict["pos_embed"][:, 0], torch.zeros(1, 32))
    assert torch.equal(back.state_dict["blocks.1.ls2.gamma"], torch.ones(32))
    assert same_outputs(back.build(), model, images(model)) == 0.0


# -- transformers -----------------------------------------------------------------------
@pytest.mark.parametrize("flavour", ["dinov2", "dinov2_reg_swiglu", "deit3"])
def test_hf_directory_loads_in_transformers_with_same_outputs(tmp_path, flavour):
    transformers = pytest.importorskip("transformers")
    model = plain(flavour)
    write(Backbone.from_model(model), "hf", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    cls = transformers.Dinov2WithRegistersModel if model.cfg.num_registers else transformers.Dinov2Model
    assert config["architectures"] == [cls.__name__]
    hf_model = cls.from_pretrained(tmp_path / "hf").eval()
    x = images(model)
    with torch.no_grad():
        out = hf_model(pixel_values=x)
        ours = model.forward_features(x)
    r = model.cfg.num_registers
    assert out.last_hidden_state.shape == (3, 1 + r + model.cfg.grid_size**2, model.cfg.embed_dim)
    assert (out.pooler_output - ours["cls_norm"]).abs().max() < 1e-5
    assert (out.last_hidden_state[:, 1 + r:] - ours["patches_norm"]).abs().max() < 1e-5
    if r:
        assert (out.last_hidden_state[:, 1:1 + r] - ours["registers_norm"]).abs().max() < 1e-5


# -- onnx -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["plain", "specialized_lora", "specialized_registers_with_cls"])
def test_onnx_matches_pytorch(tmp_path, kind):
    ort = pytest.importorskip("onnxruntime")
    if kind == "plain":
        model = plain("dinov2_reg_swiglu")
    else:
        model = specialized("paper_lora" if kind == "specialized_lora" else "paper",
                            registers_with="cls" if kind.endswith("with_cls") else "patches")
    summary = write(Backbone.from_model(model), "onnx", tmp_path / "m.onnx")
    assert "register_tokens" in summary.notes[-2 if kind == "specialized_lora" else -1]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = images(model, n=3)  # exported with batch 1: the batch axis is dynamic
    cls, patches, regs = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref = model.forward_features(x)
    assert cls.shape == (3, 48) and patches.shape == (3, 4, 48) and regs.shape == (3, 2, 48)
    for got, want in ((cls, "cls_norm"), (patches, "patches_norm"), (regs, "registers_norm")):
        assert (torch.from_numpy(got) - ref[want]).abs().max() < 1e-4


def test_onnx_refuses_bf16(tmp_path):
    with pytest.raises(ConversionError, match="fp32 only"):
        write(Backbone.from_model(plain()), "onnx", tmp_path / "m.onnx", dtype="bf16")


# -- refusals ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,name", [("timm", "t.pth"), ("dinov2", "d.pth"), ("hf", "hf")])
def test_specialized_refused_where_cls_path_has_no_slot(tmp_path, fmt, name):
    bb = Backbone.from_model(specialized("norm_ls"))
    with pytest.raises(ConversionError) as err:
        write(bb, fmt, tmp_path / name)
    msg = str(err.value)
    assert "specialized" in msg and f"the {fmt} layout" in msg and "torch, safetensors, onnx" in msg
    assert "--allow-equal-cls" in msg
    assert not (tmp_path / name).exists()
    # Even with the flag: these CLS parameters were trained away from the shared ones.
    with pytest.raises(ConversionError, match=r"\d+ of them differ from the shared weights \(e\.g\. blocks\.0\.ls1\.cls_gamma\)"):
        write(bb, fmt, tmp_path / name, allow_equal_cls=True)


def test_allow_equal_cls_converts_an_untrained_specialization(tmp_path):
    """Right after specialize() (LoRA B = 0, CLS copies equal): exact, so allowed with the flag."""
    model = specialized("paper_lora", moved=False)
    bb = Backbone.from_model(model)
    with pytest.raises(ConversionError):
        write(bb, "hf", tmp_path / "hf")
    summary = write(bb, "hf", tmp_path / "hf", allow_equal_cls=True)
    assert any("CLS parameters equal to the shared ones were dropped" in n for n in summary.notes)
    back = read_released(tmp_path / "hf", "hf")
    assert back.specialization.is_plain
    assert same_outputs(back.build(), model, images(model)) < 1e-6


def test_cli_refusal_and_summary(tmp_path):
    write(Backbone.from_model(specialized()), "safetensors", tmp_path / "s.safetensors")
    tool = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), str(tmp_path / "s.safetensors")]
    bad = subprocess.run(tool + ["--to", "dinov2", "--out", str(tmp_path / "d.pth")], capture_output=True, text=True)
    assert bad.returncode == 2 and "Formats that keep it exactly: torch, safetensors, onnx" in bad.stderr
    ok = subprocess.run(tool + ["--to", "torch", "--out", str(tmp_path / "s.pt"), "--dtype", "bf16"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    n = len(load_backbone(tmp_path / "s.safetensors").state_dict)
    assert f"{n} tensors" in ok.stdout and "dtype bfloat16" in ok.stdout


def test_layerscale_spec_on_a_checkpoint_without_layerscale_is_refused_in_one_line(tmp_path):
    # A DeiT-style timm ViT (vit_small_patch16_224 has no ls1/ls2): 'paper' would specialize LayerScale.
    source = tmp_path / "deit.safetensors"
    write(Backbone.from_model(plain("deit3")), "timm", source)
    tool = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), str(source), "--from", "timm",
            "--to", "torch"]
    bad = subprocess.run(tool + ["--spec", "paper", "--out", str(tmp_path / "p.pt")], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines()[-1] == (f"error: {source}: --spec paper specializes LayerScale, but this checkpoint "
                                           "has none (no ls1/ls2 gammas); presets without LayerScale: norm")
    assert not (tmp_path / "p.pt").exists()
    ok = subprocess.run(tool + ["--spec", "norm", "--out", str(tmp_path / "n.pt")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert load_backbone(tmp_path / "n.pt").spec == get_spec("norm").to_dict()


def test_unknown_keys_and_ambiguous_backbones_are_named(tmp_path):
    sd = {k: v for k, v in plain("deit3").state_dict().items()}
    torch.save({**sd, "blocks.0.attn.q_norm.weight": torch.ones(32)}, tmp_path / "t.pth")
    with pytest.raises(ConversionError, match=r"unexpected \['blocks\.0\.attn\.q_norm\.weight'\]"):
        read_released(tmp_path / "t.pth", "timm", num_heads=2)
    nested = {"student": {"backbone": sd}, "teacher": {"backbone": sd}, "ema": {"backbone": sd}}
    torch.save(nested, tmp_path / "n.pth")
    assert read_released(tmp_path / "n.pth", "timm", num_heads=2).state_dict.keys() == sd.keys()  # teacher
    with pytest.raises(ConversionError, match="--which model matches 0 of the backbones"):
        read_released(tmp_path / "n.pth", "timm", which="model", num_heads=2)


# -- code in pickles --------------------------------------------------------------------
class _Payload:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for any code a pickle can carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["native", "timm"])
def test_pickle_carrying_code_is_refused(tmp_path, how):
    marker = tmp_path / "pwned"
    bb = Backbone.from_model(plain("deit3"))
    obj = {"format": "lspretrain.backbone", "version": 1, "vit": bb.vit, "spec": bb.spec,
           "state_dict": bb.state_dict, "extra": _Payload(marker)}
    torch.save(obj if how == "native" else {**bb.state_dict, "extra": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ConversionError, match="refused to unpickle"):
        if how == "native":
            read_source(tmp_path / "evil.pt")
        else:
            read_released(tmp_path / "evil.pt", "timm", num_heads=2)
    assert not marker.exists()
    # The payload is live: an unsafe load (in a child process) does create the marker.
    live = tmp_path / "live"
    torch.save({"x": _Payload(live)}, tmp_path / "live.pt")
    code = f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); torch.load({str(tmp_path / 'live.pt')!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert live.exists()


def test_deepspeed_engine_loads_are_weights_only(tmp_path):
    """The deepspeed strategy's resume goes through DeepSpeed's checkpoint engine, which asks
    for ``weights_only=False``; inside ``deepspeed_weights_only()`` a code-carrying file is refused
    and a weights file still loads."""
    import pickle

    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from lspretrain.engine.safe_load import deepspeed_weights_only

    marker = tmp_path / "pwned"
    torch.save({"module": {"w": torch.ones(2)}, "extra": _Payload(marker)}, tmp_path / "evil_model_states.pt")
    torch.save({"module": {"w": torch.ones(2)}}, tmp_path / "good_model_states.pt")
    engine = TorchCheckpointEngine()
    with deepspeed_weights_only():
        with pytest.raises(pickle.UnpicklingError):
            engine.load(str(tmp_path / "evil_model_states.pt"))
        assert torch.equal(engine.load(str(tmp_path / "good_model_states.pt"))["module"]["w"], torch.ones(2))
    assert not marker.exists()
    assert torch_checkpoint_engine.torch is torch  # DeepSpeed's own torch is back afterwards
