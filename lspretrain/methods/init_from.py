"""Starting a method's backbone (and DINO/iBOT heads) from existing weights: ``method.init_from``.

One path for every method (DINOv2 continued pretraining, DeiT-III fine-tuning):

1. **Read** the source through ``lspretrain.convert``: with ``init_from_format`` empty, our
   backbone file (torch / safetensors) or a training run (run directory, DCP or DeepSpeed
   checkpoint; ``which`` picks teacher / student / ema / model); with ``timm`` / ``dinov2`` /
   ``hf``, a released plain checkpoint. The head count is not in released weights: the recipe's
   is used.
2. **Check** the architecture against the recipe's model (``model.arch`` + ``model.overrides``)
   before anything is loaded: the fields that change the function (width, depth, heads, patch,
   FFN kind, qkv bias, LayerScale, registers, CLS position, norm eps) and every tensor name and
   shape. A mismatch is refused in one line naming the file and the keys. Only the resolution
   may differ, and only ``mask_token`` (iBOT's, training-only) may be absent on either side.
3. **Specialize** a plain source when ``model.spec`` specializes: ``specialize()`` on the
   source model, so every CLS twin starts as a copy of its shared weights and the model computes
   the source's function. A specialized source must have the recipe's specialization.
4. **Resample** the positional embedding to the recipe's grid the way the source's own model
   resizes it at run time, so that the loaded model at the recipe's resolution computes what the
   source computes on the same input: for the dinov2 layout dinov2's rule
   (``interpolate_offset`` / ``interpolate_antialias`` from the file's ``dinov2_model_args``,
   else those of the torch.hub models: 0.1 / no antialias, with registers 0.0 / antialias); for
   everything else our ViT's bicubic resize, the one DeiT-III fine-tuning uses (also HF's).

Heads (``head_init_from``): a DCP training run / checkpoint of ours, or a weights file holding
DINO/iBOT heads in our layout or the dinov2 repository's (``dino_head.mlp.*``,
``last_layer.weight_g``/``weight_v`` of its weight-normalised prototypes, whose gain dinov2 keeps
at 1), possibly nested (``teacher.``, ``model.teacher.``).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..convert import IMPORT_FORMATS, Backbone, ConversionError, read_released, read_source
from ..convert.common import load_tensor_file, released_model_args, select_backbone, unwrap
from ..models import SpecializationSpec, VisionTransformer, is_cls_param, specialize
from ..models.vit import resample_pos_embed

__all__ = ["INIT_FORMATS", "check_init_format", "read_init_source", "fit_backbone", "init_backbone", "init_heads"]

log = logging.getLogger(__name__)

INIT_FORMATS = ("", *IMPORT_FORMATS)  # "": our backbone file or a training run
# ViTConfig fields that change what the weights compute, beyond what tensor shapes show.
_ARCH_FIELDS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "ffn", "qkv_bias", "num_registers",
                "pos_embed_cls", "norm_eps")
_TRAINING_ONLY = {"mask_token"}  # iBOT's token: a source without one keeps the model's, one the model lacks is dropped
_HEAD_ANCHOR = "dino_head.mlp.0.weight"


def check_init_format(fmt: str, key: str) -> None:
    if fmt not in INIT_FORMATS:
        raise ValueError(f"{key}={fmt!r}: expected '' (our backbone file or a training run) or one of {', '.join(IMPORT_FORMATS)}")


def read_init_source(path: str, fmt: str, which: str | None, num_heads: int, key: str = "method.init_from") -> Backbone:
    """The source backbone as written (plain or specialized, at its own resolution)."""
    try:
        if fmt:
            return read_released(path, fmt, which=which, num_heads=num_heads)
        return read_source(path, which)
    except ConversionError as err:
        hint = " (a released checkpoint: set method.init_from_format to timm, dinov2 or hf)" \
            if not fmt and Path(path).is_file() and "not an lspretrain backbone file" in str(err) else ""
        raise ValueError(f"{key}={path!r}: {err}{hint}") from None


def _spec_blocks(spec: SpecializationSpec, depth: int) -> tuple:
    """What a spec does to a model of ``depth`` blocks ("first_third" and its block list alike)."""
    return (*(spec.blocks(n, depth) for n in ("norm", "qkv", "layerscale")), spec.final_norm, spec.lora_rank,
            spec.registers_with)


def _check_architecture(bb: Backbone, model: VisionTransformer, label: str) -> None:
    src, dst = bb.config, model.cfg
    problems = [f"{f} file {getattr(src, f)!r} vs recipe {getattr(dst, f)!r}" for f in _ARCH_FIELDS
                if getattr(src, f) != getattr(dst, f)]
    if (src.layerscale_init is None) != (dst.layerscale_init is None):
        problems.append(f"LayerScale file {'none' if src.layerscale_init is None else 'yes'} vs recipe "
                        f"{'none' if dst.layerscale_init is None else 'yes'} (layerscale_init)")
    have = {k: v.shape for k, v in bb.state_dict.items() if not is_cls_param(k)}
    want = {k: v.shape for k, v in model.state_dict().items() if not is_cls_param(k)}
    missing = sorted(set(want) - set(have) - _TRAINING_ONLY)
    unexpected = sorted(set(have) - set(want) - _TRAINING_ONLY)
    if missing:
        problems.append(f"missing from the file: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"not in the recipe's model: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    # pos_embed may differ in its grid only (resampled); its CLS slot is pos_embed_cls, checked above.
    problems += [f"{k} file {tuple(have[k])} vs recipe {tuple(want[k])}" for k in sorted(set(have) & set(want))
                 if k != "pos_embed" and have[k] != want[k]]
    if problems:
        raise ValueError(f"{label}: the backbone does not fit model.arch/model.overrides: {'; '.join(problems)}")


def _dinov2_interpolation(path: str, has_registers: bool) -> tuple[float, bool]:
    """(``interpolate_offset``, ``interpolate_antialias``) of the dinov2 model a file was released
    for: from its safetensors ``dinov2_model_args`` (our converter writes them), else the torch.hub
    constructors' (plain models 0.1 / False; register models 0.0 / True)."""
    args = {}
    if Path(path).suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:  # the header only, not the tensors
            args = released_model_args(dict(f.metadata() or {}), "dinov2")
    default = (0.0, True) if has_registers else (0.1, False)
    return float(args.get("interpolate_offset", default[0])), bool(args.get("interpolate_antialias", default[1]))


def _resample(pos: torch.Tensor, grid: int, has_cls: bool, offset: float, antialias: bool) -> torch.Tensor:
    """``pos`` on a ``grid`` x ``grid`` patch grid. Without offset or antialias: our ViT's rule.
    Otherwise dinov2's ``interpolate_pos_encoding``: bicubic on the float32 grid, by the scale
    factor (grid + offset) / source grid when there is an offset (the sampling positions differ
    from a resize to ``grid``), with or without antialiasing."""
    if not offset and not antialias:
        return resample_pos_embed(pos, (grid, grid), has_cls)
    cls_pos, patches = (pos[:, :1], pos[:, 1:]) if has_cls else (pos[:, :0], pos)
    side, dim = math.isqrt(patches.shape[1]), patches.shape[-1]
    size = {"scale_factor": ((grid + offset) / side,) * 2} if offset else {"size": (grid, grid)}
    out = F.interpolate(patches.float().reshape(1, side, side, dim).permute(0, 3, 1, 2), mode="bicubic",
                        antialias=antialias, **size)
    return torch.cat([cls_pos, out.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1)


def fit_backbone(bb: Backbone, model: VisionTransformer, fmt: str = "", label: str = "method.init_from",
                 path: str | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state dict in ``model``'s keys, notes): ``bb`` checked against ``model``, specialized like
    it, its positional embedding on ``model``'s grid. Nothing is loaded."""
    _check_architecture(bb, model, label)
    depth, notes = model.cfg.depth, []
    want = getattr(model, "specialization", None) or SpecializationSpec()
    has = bb.specialization
    if any(is_cls_param(k) for k in bb.state_dict):
        if _spec_blocks(has, depth) != _spec_blocks(want, depth):
            theirs = sorted(k for k in bb.state_dict if is_cls_param(k))
            ours = sorted(k for k in model.state_dict() if is_cls_param(k))
            only_file, only_model = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
            raise ValueError(f"{label}: the backbone does not fit model.spec: the file is specialized ({has.to_dict()}), "
                             f"the recipe {want.to_dict()}: CLS keys only in the file {only_file[:6]}, only in the "
                             f"model {only_model[:6]}; a specialized backbone starts only a run with its own specialization")
        sd = {k: v.float() if v.is_floating_point() else v for k, v in bb.state_dict.items()}
    elif not want.is_plain:
        # specialize() on the source model: every CLS twin starts as a copy of its shared weights.
        sd = specialize(bb.build(), want).state_dict()
        notes.append("specialized as model.spec: the CLS copies equal the shared weights")
    else:
        sd = {k: v.float() if v.is_floating_point() else v for k, v in bb.state_dict.items()}
    pos, has_cls, grid = sd["pos_embed"], model.cfg.pos_embed_cls, model.cfg.grid_size
    side = math.isqrt(pos.shape[1] - has_cls)
    if side != grid:
        offset, antialias = _dinov2_interpolation(path, "reg_token" in sd) if fmt == "dinov2" else (0.0, False)
        sd["pos_embed"] = _resample(pos, grid, has_cls, offset, antialias)
        rule = f"dinov2's rule (offset {offset}, antialias {antialias})" if fmt == "dinov2" else "bicubic"
        notes.append(f"positional embedding resampled {side}x{side} -> {grid}x{grid} ({rule})")
    own = model.state_dict()
    for k in _TRAINING_ONLY:
        if k in sd and k not in own:
            del sd[k]
            notes.append(f"{k} dropped: the recipe's model has none")
        elif k in own and k not in sd:
            notes.append(f"{k} not in the file: the model's own initialisation is kept")
    return sd, notes


def init_backbone(model: VisionTransformer, path: str, fmt: str = "", which: str | None = None,
                  key: str = "method.init_from") -> list[str]:
    """Load ``path`` (read as ``fmt``) into ``model`` after the checks of ``fit_backbone``."""
    label = f"{key}={path!r}"
    bb = read_init_source(path, fmt, which, model.cfg.num_heads, key)
    sd, notes = fit_backbone(bb, model, fmt, label, path)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert set(missing) <= _TRAINING_ONLY and not unexpected, (missing, unexpected)  # fit_backbone checked both
    for note in [f"backbone from {bb.source}"] + notes:
        log.info("%s: %s", key, note)
    return notes


# -- heads -------------------------------------------------------------------------------------
def _read_dcp_heads(path: Path, which: str | None, label: str) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ..convert.sources import is_dcp, strategy_dir
    from ..engine.safe_load import UnsafeCheckpointError, dcp_load, read_dcp_metadata

    try:
        state = strategy_dir(path)
    except ConversionError as err:
        raise ValueError(f"{label}: {err}") from None
    if not is_dcp(state):
        raise ValueError(f"{label}: heads are read from a DCP training checkpoint (fsdp2/ddp/single) or a weights file; "
                         f"{state} is neither")
    try:
        meta = read_dcp_metadata(state).state_dict_metadata  # refuses metadata that carries code
    except UnsafeCheckpointError as err:
        raise ValueError(f"{label}: {err}") from None
    tensors = {k: md for k, md in meta.items() if isinstance(md, TensorStorageMetadata)}
    prefix = select_backbone(tensors, which, str(state), anchor=_HEAD_ANCHOR)
    sd = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in tensors.items()
          if k.startswith((prefix + "dino_head.", prefix + "ibot_head."))}
    dcp_load(sd, state, no_dist=True)
    return {k[len(prefix):]: v for k, v in sd.items()}


def _read_file_heads(path: Path, which: str | None) -> dict[str, torch.Tensor]:
    obj, _ = load_tensor_file(path)  # weights-only pickle or safetensors
    flat = unwrap(obj, str(path))
    prefix = select_backbone(flat, which, str(path), anchor=_HEAD_ANCHOR)
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith((prefix + "dino_head.", prefix + "ibot_head."))}


def _from_dinov2_weight_norm(sd: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """dinov2's ``weight_norm`` prototypes (``weight_g`` fixed at 1, ``weight_v``) -> our
    ``last_layer.weight``, which the head normalises row by row at use, as ``weight_v`` was."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".last_layer.weight_g"):
            if not torch.all(v == 1):
                raise ValueError(f"{label}: {k} is not all ones: the prototypes' gain was trained, which our head "
                                 f"(unit-norm prototypes, as dinov2 trains them) cannot represent")
        elif k.endswith(".last_layer.weight_v"):
            out[k[: -len("_v")]] = v
        else:
            out[k] = v
    return out


def init_heads(heads: dict[str, nn.Module], path: str, which: str | None = None,
               key: str = "method.head_init_from") -> list[str]:
    """Load the heads named in ``heads`` (``dino_head``, ``ibot_head``) from ``path``; every
    tensor name and shape must fit, else one line names the file and the keys."""
    label = f"{key}={path!r}"
    p = Path(path)
    try:
        sd = _read_dcp_heads(p, which, label) if p.is_dir() else _read_file_heads(p, which)
    except ConversionError as err:
        raise ValueError(f"{label}: {err}") from None
    sd = _from_dinov2_weight_norm(sd, label)
    problems, loaded = [], {}
    for name, head in heads.items():
        want = head.state_dict()
        have = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        if not have:
            problems.append(f"no {name}.* in the file")
            continue
        missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        shapes = [f"{name}.{k} file {tuple(have[k].shape)} vs recipe {tuple(want[k].shape)}"
                  for k in sorted(set(want) & set(have)) if have[k].shape != want[k].shape]
        problems += [f"{name}.{k} missing from the file" for k in missing] + \
                    [f"{name}.{k} not in the recipe's head" for k in unexpected] + shapes
        loaded[name] = {k: v.float() for k, v in have.items()}
    if problems:
        raise ValueError(f"{label}: the heads do not fit method.head_* / ibot_separate_head: {'; '.join(problems[:8])}")
    for name, state in loaded.items():
        heads[name].load_state_dict(state)
    notes = [f"{name} from {path}" for name in loaded]
    unused = sorted({k.split(".")[0] for k in sd} - set(heads))
    notes += [f"{name} in the file not used (method.ibot_separate_head=false)" for name in unused]
    for note in notes:
        log.info("%s: %s", key, note)
    return notes
