"""Checkpoint conversion: our backbones to and from external formats (docs/CONVERT.md).

One module per format, each with its key map in one place (``timm``, ``dinov2``, ``hf``,
``onnx``; ``native`` for our own torch/safetensors files) and ``sources`` for training
checkpoints. Everything goes through a ``Backbone`` (state dict + ViTConfig + spec):

    bb = read_source("runs/x", which="teacher")        # run dir, DCP, DeepSpeed, our file
    write(bb, "hf", Path("out/hf"))                      # -> Summary
    bb = read_released("dinov2_vitl14.pth", "dinov2", spec="paper")   # plain -> specialized
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..models import PRESETS, get_spec, specialize
from . import dinov2, hf, native, onnx, timm
from .common import Backbone, ConversionError, Summary, load_tensor_file, select_backbone, unwrap
from .native import load_backbone
from .sources import read_training_checkpoint

__all__ = [
    "EXPORT_FORMATS", "IMPORT_FORMATS", "Backbone", "ConversionError", "Summary", "read_source", "read_released",
    "write", "load_backbone",
]



def _keeps_cls(save: Callable[[Backbone, Path, str], Summary]) -> Callable[[Backbone, Path, str, bool], Summary]:
    """A writer of a format with a slot for every CLS parameter (``EXACT_FORMATS``), which has
    nothing to drop, as a writer taking ``allow_equal_cls``."""
    return lambda bb, out, dtype, allow_equal_cls: save(bb, out, dtype)


# --to name -> writer(backbone, out, dtype, allow_equal_cls) -> Summary. The plain layouts (timm,
# dinov2, hf) refuse a specialized backbone unless allow_equal_cls and its CLS parameters are
# still equal to the shared ones.
EXPORT_FORMATS: dict[str, Callable[[Backbone, Path, str, bool], Summary]] = {
    "torch": _keeps_cls(native.save_torch),
    "safetensors": _keeps_cls(native.save_safetensors),
    "timm": timm.save,
    "dinov2": dinov2.save,
    "hf": hf.save,
    "onnx": _keeps_cls(onnx.save),
}


def _tensor_file_reader(module) -> Callable[[Path, str | None, int | None], Backbone]:
    """A reader of a released single-file format (timm, dinov2): the backbone ``which`` of the
    file, renamed by ``module.load``."""
    def read(path: Path, which: str | None, num_heads: int | None) -> Backbone:
        obj, meta = load_tensor_file(path)
        flat = unwrap(obj, str(path))
        prefix = select_backbone(flat, which, str(path))
        sd = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        return module.load(sd, meta, str(path), num_heads)
    return read


# --from name -> reader(path, which, num_heads) -> plain Backbone (the CLI's choices). An HF
# directory holds one backbone and its config names the head count.
IMPORT_FORMATS: dict[str, Callable[[Path, str | None, int | None], Backbone]] = {
    "timm": _tensor_file_reader(timm),
    "dinov2": _tensor_file_reader(dinov2),
    "hf": lambda path, which, num_heads: hf.load(path),
}


def read_source(path: str | Path, which: str | None = None, num_heads: int | None = None) -> Backbone:
    """Our backbone file, or the backbone ``which`` of a run directory / DCP / DeepSpeed checkpoint."""
    path = Path(path)
    if path.is_file():
        return load_backbone(path)
    if path.is_dir():
        return read_training_checkpoint(path, which, num_heads)
    raise ConversionError(f"{path}: no such file or directory")


def read_released(
    path: str | Path, fmt: str, spec: str | None = None, which: str | None = None, num_heads: int | None = None
) -> Backbone:
    """A released plain checkpoint (``fmt`` timm/dinov2/hf) as our backbone, specialized by the
    preset ``spec`` when given (CLS copies start equal to the shared weights: same outputs)."""
    path = Path(path)
    if fmt not in IMPORT_FORMATS:
        raise ConversionError(f"--from {fmt!r}: expected one of {', '.join(IMPORT_FORMATS)}")
    bb = IMPORT_FORMATS[fmt](path, which, num_heads)
    model = bb.build()  # checks that every tensor found its place
    if spec is None or get_spec(spec).is_plain:
        return bb
    depth = len(model.blocks)
    if get_spec(spec).blocks("layerscale", depth) and model.cfg.layerscale_init is None:
        # e.g. timm's vit_small_patch16_224: there is no LayerScale gamma to give the CLS token a copy of.
        fitting = [n for n, s in PRESETS.items() if not s.is_plain and not s.blocks("layerscale", depth)]
        raise ConversionError(f"{path}: --spec {spec} specializes LayerScale, but this checkpoint has none "
                              f"(no ls1/ls2 gammas); presets without LayerScale: {', '.join(fitting)}")
    try:
        specialized = Backbone.from_model(specialize(model, spec), bb.source)
    except ValueError as err:  # a spec this model cannot take, e.g. a LoRA rank above its width
        raise ConversionError(f"{path}: --spec {spec}: {err}") from None
    specialized.notes = bb.notes + [f"specialized with preset {spec!r} (CLS copies equal the shared weights)"]
    return specialized


def write(bb: Backbone, fmt: str, out: str | Path, dtype: str = "fp32", allow_equal_cls: bool = False) -> Summary:
    """``bb`` in the export format ``fmt`` (``EXPORT_FORMATS``) under ``out``."""
    if fmt not in EXPORT_FORMATS:
        raise ConversionError(f"--to {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    return EXPORT_FORMATS[fmt](bb, Path(out), dtype, allow_equal_cls)
