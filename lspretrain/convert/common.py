"""What every format module shares: the ``Backbone`` bundle (weights + how to rebuild them),
safe file reading, backbone selection inside a training checkpoint, shape-based config
inference for released checkpoints, the refusal of layouts that cannot hold the CLS path,
and the summary of what was written.
"""
from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..models import SpecializationSpec, VisionTransformer, ViTConfig, get_spec, is_cls_param, specialize
from ..models.specialize import cls_param_matches_shared, spec_from_state_dict

__all__ = [
    "Backbone", "ConversionError", "load_tensor_file", "select_backbone", "infer_vit_config",
    "require_plain", "cast", "Summary", "EXACT_FORMATS", "unwrap", "save_state_dict",
]

# Formats whose layout holds the specialized CLS parameters (named in every refusal).
EXACT_FORMATS = ("torch", "safetensors", "onnx")


class ConversionError(ValueError):
    """A conversion that would not be exact, or a source that cannot be read safely."""


@dataclass
class Backbone:
    """A backbone's state dict with the architecture and specialization that rebuild it.

    ``notes`` records what a conversion did besides renaming (a training-only tensor dropped,
    a constant slot added), so that the summary shows it instead of doing it silently."""

    state_dict: dict[str, torch.Tensor]
    vit: dict  # ViTConfig fields
    spec: dict = field(default_factory=lambda: SpecializationSpec().to_dict())
    source: str = "?"
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> ViTConfig:
        return ViTConfig(**self.vit)

    @property
    def specialization(self) -> SpecializationSpec:
        return get_spec(dict(self.spec))

    @classmethod
    def from_model(cls, model: VisionTransformer, source: str = "model") -> "Backbone":
        spec = getattr(model, "specialization", None) or SpecializationSpec()
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        return cls(sd, model.cfg.to_dict(), spec.to_dict(), source)

    def build(self) -> VisionTransformer:
        """The model these weights belong to (eval mode); every key must fit (strict load)."""
        model = VisionTransformer(self.config)
        spec = self.specialization
        if not spec.is_plain:
            specialize(model, spec)
        sd = {k: v.float() if v.is_floating_point() else v for k, v in self.state_dict.items()}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ConversionError(
                f"{self.source}: weights do not fit the stored architecture/specialization: "
                f"missing {sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]}"
            )
        return model.eval()


def load_tensor_file(path: str | Path) -> tuple[dict, dict[str, str]]:
    """(object, safetensors metadata) from a ``.safetensors`` file or a weights-only pickle.

    Pickles are only ever read with ``weights_only=True``: a checkpoint that carries code (an
    object whose ``__reduce__`` runs something) is refused before anything executes."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    try:
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise ConversionError(
            f"{path}: refused to unpickle: the file holds objects outside torch's weights-only "
            f"allow-list, i.e. it could run code when loaded ({first}). Only weights-only pickles, "
            f"safetensors and torch.distributed.checkpoint directories are read."
        ) from None


def unwrap(obj, source: str) -> dict[str, torch.Tensor]:
    """Flat ``{dotted key: tensor}`` from a checkpoint object: nested dicts are joined with dots
    (``{"model": {"teacher": {...}}}`` -> ``model.teacher....``), non-tensors are skipped."""
    if not isinstance(obj, dict):
        raise ConversionError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    flat: dict[str, torch.Tensor] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, torch.Tensor):
                flat[prefix + str(k)] = v
            elif isinstance(v, dict):
                walk(v, f"{prefix}{k}.")

    walk(obj, "")
    return flat


ANCHOR = "patch_embed.proj.weight"  # every backbone of every layout we read has exactly one
_ROLES = ("teacher", "student", "ema")


def select_backbone(keys, which: str | None, source: str, anchor: str = ANCHOR) -> str:
    """The key prefix of the backbone ``which`` names among those in a checkpoint.

    A training checkpoint may hold several (DINOv2: ``student.backbone.`` and
    ``teacher.backbone.``, maybe under ``model.``); each is found by its patch embedding.
    ``which`` is a role (teacher/student/ema) matched against the prefix's parts, or
    ``model`` for the one that is none of them. Without ``which``: the only backbone, else
    the teacher (DINOv2 releases the teacher), else the EMA."""
    prefixes = sorted(k[: -len(anchor)] for k in keys if k.endswith(anchor))
    if not prefixes:
        raise ConversionError(f"{source}: no backbone found (no key ends with {anchor!r})")

    def roles(p: str) -> set[str]:
        return set(p.rstrip(".").split(".")) & set(_ROLES)

    if which is None:
        if len(prefixes) == 1:
            return prefixes[0]
        for role in ("teacher", "ema"):
            hits = [p for p in prefixes if role in roles(p)]
            if len(hits) == 1:
                return hits[0]
        raise ConversionError(f"{source}: several backbones {prefixes}; choose one with --which")
    hits = [p for p in prefixes if (which in roles(p) if which in _ROLES else not roles(p))]
    if len(hits) != 1:
        found = ", ".join(repr(p or "<top level>") for p in prefixes)
        raise ConversionError(f"{source}: --which {which} matches {len(hits)} of the backbones found ({found})")
    return hits[0]


def infer_vit_config(sd: dict[str, torch.Tensor], source: str, num_heads: int | None = None, **known) -> dict:
    """ViTConfig fields from the shapes of a state dict in our key layout.

    The head count is not in the weights: ``num_heads`` or width/64 (every released ViT/DINOv2
    size uses 64-wide heads). ``known`` (e.g. from file metadata) wins over inference."""
    try:
        patch = sd["patch_embed.proj.weight"]
        dim = patch.shape[0]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        regs = sd["reg_token"].shape[1] if "reg_token" in sd else 0
        n_pos = sd["pos_embed"].shape[1]
        swiglu = "blocks.0.mlp.w12.weight" in sd
        hidden = sd["blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0]
        qkv_bias = "blocks.0.attn.qkv.bias" in sd
    except KeyError as err:
        raise ConversionError(f"{source}: missing {err.args[0]!r}, not a ViT state dict in the expected layout") from None
    grid = math.isqrt(n_pos)
    pos_cls = grid * grid != n_pos
    if pos_cls:
        grid = math.isqrt(n_pos - 1)
        if grid * grid != n_pos - 1:
            raise ConversionError(
                f"{source}: pos_embed has {n_pos} positions: neither a square patch grid nor one plus "
                f"a CLS slot (positions for register tokens are not supported)"
            )
    if swiglu:
        # Our (and dinov2's) rule maps int(dim*ratio) to a multiple of 8 near 2/3 of it: pick
        # the ratio that gives the stored width back; build() verifies it.
        mlp_ratio = hidden / 2 * 1.5 / dim
    else:
        mlp_ratio = hidden / dim
    cfg = dict(
        img_size=grid * patch.shape[-1], patch_size=patch.shape[-1], in_chans=patch.shape[1], embed_dim=dim,
        depth=depth, num_heads=num_heads or max(dim // 64, 1), mlp_ratio=mlp_ratio, ffn="swiglu" if swiglu else "mlp",
        qkv_bias=qkv_bias, layerscale_init=1.0 if "blocks.0.ls1.gamma" in sd else None, num_registers=regs,
        pos_embed_cls=pos_cls, mask_token="mask_token" in sd,
    )
    cfg.update({k: v for k, v in known.items() if v is not None})
    valid = {f.name for f in fields(ViTConfig)}
    try:
        return ViTConfig(**{k: v for k, v in cfg.items() if k in valid}).to_dict()
    except ValueError as err:
        raise ConversionError(f"{source}: {err}") from None


def require_plain(bb: Backbone, fmt: str, allow_equal_cls: bool = False) -> Backbone:
    """``bb`` itself when it has no CLS parameters; otherwise a refusal naming the formats that
    keep them, or (``allow_equal_cls``) the plain backbone when every CLS parameter still equals
    its shared twin, so that dropping them changes nothing."""
    cls_keys = sorted(k for k in bb.state_dict if is_cls_param(k))
    if not cls_keys:
        return bb
    differing = [k for k in cls_keys if not cls_param_matches_shared(k, bb.state_dict)]
    if not allow_equal_cls or differing:
        why = (
            f"{len(differing)} of them differ from the shared weights (e.g. {differing[0]})"
            if allow_equal_cls
            else "pass --allow-equal-cls to convert anyway when they all still equal the shared weights"
        )
        raise ConversionError(
            f"{bb.source}: the backbone is specialized ({len(cls_keys)} CLS parameters such as {cls_keys[0]}); "
            f"the {fmt} layout has no slot for a separate [CLS] path, so converting would change the "
            f"model. Formats that keep it exactly: {', '.join(EXACT_FORMATS)}. ({why})"
        )
    sd = {k: v for k, v in bb.state_dict.items() if not is_cls_param(k)}
    note = f"{len(cls_keys)} CLS parameters equal to the shared ones were dropped (--allow-equal-cls)"
    return Backbone(sd, bb.vit, SpecializationSpec().to_dict(), bb.source, bb.notes + [note])


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_dinov2_family_slots(sd: dict[str, torch.Tensor], cfg: ViTConfig, notes: list[str], layout: str) -> None:
    """The dinov2 repository and HF Dinov2 always have a CLS position and a mask token; add
    zero ones where our model has none (in place, each addition noted): CLS + 0 = CLS, and the
    mask token is used only for masked inputs."""
    if not cfg.pos_embed_cls:
        pos = sd["pos_embed"]
        sd["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
        notes.append(f"zero CLS position added ({layout} always has one; CLS + 0 = CLS)")
    if "mask_token" not in sd:
        sd["mask_token"] = sd["cls_token"].new_zeros(1, cfg.embed_dim)
        notes.append(f"zero mask_token added ({layout} always has one; used only for masked inputs)")


def cast(sd: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors to ``dtype``, contiguous and detached (safetensors wants both)."""
    target = DTYPES[dtype]
    return {k: (v.to(target) if v.is_floating_point() else v).detach().contiguous() for k, v in sd.items()}


def save_state_dict(sd: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    """A bare state dict, as released checkpoints are: safetensors (``metadata`` in the header)
    when ``out`` ends in ``.safetensors``, else a weights-only pickle (``metadata`` dropped)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(out), metadata={"format": "pt", **metadata})
    else:
        torch.save(sd, out)


def backbone_from_released(sd: dict[str, torch.Tensor], source: str, num_heads: int | None, model_args: dict,
                           notes: list[str] | None = None) -> Backbone:
    """A ``Backbone`` from a state dict already renamed to our keys; ``model_args`` (the
    constructor arguments a timm/dinov2 file may carry) settle what the tensors cannot show."""
    vit = infer_vit_config(sd, source, num_heads or model_args.get("num_heads"), layerscale_init=model_args.get("init_values"))
    return Backbone(sd, vit, spec_from_state_dict(sd, vit["depth"]).to_dict(), source, list(notes or []))


def save_released(fmt: str, sd: dict[str, torch.Tensor], model_args: dict, notes: list[str], out: Path, dtype: str,
                  args_label: str) -> "Summary":
    """A released-layout state dict with the constructor arguments that rebuild its model, as
    ``{fmt}_model_args`` in the safetensors header (read back by ``released_model_args``)."""
    sd = cast(sd, dtype)
    args = json.dumps(model_args)
    save_state_dict(sd, out, {f"{fmt}_model_args": args})
    return Summary.of(fmt, [out], sd, notes + [f"{args_label}: {args}"])


def released_model_args(meta: dict[str, str], fmt: str) -> dict:
    return json.loads(meta.get(f"{fmt}_model_args", "{}"))


@dataclass
class Summary:
    """What a conversion wrote, printed by the CLI and returned to Python callers."""

    fmt: str
    paths: list[str]
    keys: int
    params: int
    dtypes: list[str]
    bytes: int
    notes: list[str]

    @classmethod
    def of(cls, fmt: str, paths: list[Path], sd: dict[str, torch.Tensor], notes: list[str]) -> "Summary":
        return cls(
            fmt, [str(p) for p in paths], len(sd), sum(v.numel() for v in sd.values()),
            sorted({str(v.dtype).replace("torch.", "") for v in sd.values()}),
            sum(p.stat().st_size for p in paths), list(notes),
        )

    def __str__(self) -> str:
        lines = [
            f"wrote {self.fmt}: {', '.join(self.paths)}",
            f"  {self.keys} tensors, {self.params:,} parameters, dtype {'/'.join(self.dtypes)}, {self.bytes:,} bytes",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
