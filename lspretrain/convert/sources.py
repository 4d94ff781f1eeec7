"""Reading a backbone out of a training run: a run directory, a torch.distributed.checkpoint
(fsdp2) directory or a DeepSpeed ZeRO 1/2/3 checkpoint, on one CPU process without a process
group. Nothing is unpickled beyond weights: DCP's metadata through an unpickler that knows only
its own metadata classes (``engine.safe_load``), tensors and other values weights-only, and
DeepSpeed's files weights-only with an allow-list of its three plain data classes.

The architecture comes from the run's ``config.yaml`` (``model.arch``, ``model.spec``,
``model.overrides``), found in the checkpoint's parent directories; without one it is inferred
from the weights (head count width/64, registers with patches), which the CLI lets
``--num-heads`` correct.
"""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import torch
import yaml

from ..engine.checkpoint_layout import CheckpointDir
from ..engine.safe_load import UnsafeCheckpointError, dcp_load, deepspeed_weights_only, read_dcp_metadata
from ..models import get_spec, vit_config
from ..models.specialize import spec_from_state_dict
from .common import Backbone, ConversionError, infer_vit_config, select_backbone

__all__ = ["is_dcp", "is_deepspeed", "newest_checkpoint", "strategy_dir", "read_training_checkpoint"]


def is_dcp(path: Path) -> bool:
    return (path / ".metadata").is_file()


def _deepspeed_tag_dir(path: Path) -> Path | None:
    """The directory holding a DeepSpeed checkpoint's ``*_model_states.pt``: ``path`` itself,
    the tag its ``latest`` file names, or its only tag directory (the engine saves one tag,
    ``zero``, per checkpoint directory and no ``latest``)."""
    if any(path.glob("*model_states.pt")):
        return path
    latest = path / "latest"
    if latest.is_file():
        tag = path / latest.read_text().strip()
        return tag if any(tag.glob("*model_states.pt")) else None
    tags = [d for d in path.iterdir() if d.is_dir() and any(d.glob("*model_states.pt"))] if path.is_dir() else []
    return tags[0] if len(tags) == 1 else None


def is_deepspeed(path: Path) -> bool:
    return _deepspeed_tag_dir(path) is not None


def newest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run (``engine.checkpoint_layout``); saves in
    progress are never picked."""
    checkpoints = CheckpointDir.of_run(run_dir)
    newest = checkpoints.newest()
    if newest is None:
        raise ConversionError(f"{run_dir}: not a checkpoint, and no complete checkpoint under "
                              f"{checkpoints.root} (step_N/COMPLETE.json)")
    return newest


def strategy_dir(path: Path) -> Path:
    """The DCP or DeepSpeed directory ``path`` designates: itself, its step directory's
    ``state/``, or the newest complete checkpoint's ``state/`` (a run directory)."""
    for candidate in (path, CheckpointDir.state_dir(path)):
        if is_dcp(candidate) or is_deepspeed(candidate):
            return candidate
    state = CheckpointDir.state_dir(newest_checkpoint(path))
    if not (is_dcp(state) or is_deepspeed(state)):
        raise ConversionError(f"{state}: neither a DCP (.metadata) nor a DeepSpeed (*model_states.pt) checkpoint")
    return state


def _run_config(path: Path) -> dict | None:
    """The ``model`` section of the nearest ``config.yaml`` at or above ``path`` (the run
    directory is three levels above a checkpoint's ``state/``)."""
    for d in [path, *path.parents][:4]:
        f = d / "config.yaml"
        if f.is_file():
            return (yaml.safe_load(f.read_text()) or {}).get("model")
    return None


def _read_dcp(path: Path, which: str | None) -> tuple[dict[str, torch.Tensor], str]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = read_dcp_metadata(path)
    except UnsafeCheckpointError as err:
        raise ConversionError(str(err)) from None
    tensors = {k: md for k, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}
    prefix = select_backbone(tensors, which, str(path))
    # Only the chosen backbone is read; DCP assembles every tensor from all ranks' shards.
    sd = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in tensors.items() if k.startswith(prefix)}
    dcp_load(sd, path, no_dist=True)
    return {k[len(prefix):]: v for k, v in sd.items()}, prefix


def _read_deepspeed(path: Path, which: str | None) -> tuple[dict[str, torch.Tensor], str]:
    from deepspeed.utils import zero_to_fp32

    tag_dir = _deepspeed_tag_dir(path)
    try:
        with deepspeed_weights_only(), contextlib.redirect_stdout(None):
            # ZeRO 1/2/3 alike: the fp32 master weights, merged from every rank's partition.
            full = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except pickle.UnpicklingError as err:
        raise ConversionError(f"{tag_dir}: refused to unpickle a DeepSpeed file holding more than weights: {err}") from None
    prefix = select_backbone(full, which, str(tag_dir))
    return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}, prefix


def read_training_checkpoint(path: Path, which: str | None = None, num_heads: int | None = None) -> Backbone:
    """The backbone ``which`` (teacher/student/ema/model) of a run directory or checkpoint."""
    path = strategy_dir(path)
    sd, prefix = (_read_dcp if is_dcp(path) else _read_deepspeed)(path, which)
    source = f"{path}[{prefix or '<top level>'}]"
    model = _run_config(path)
    if model is not None:
        vit = vit_config(model["arch"], **(model.get("overrides") or {})).to_dict()
        spec = get_spec(model.get("spec", "none")).to_dict()
    else:
        vit = infer_vit_config(sd, source, num_heads)
        spec = spec_from_state_dict(sd, vit["depth"]).to_dict()
    # Training-time regularisation is not part of the weights' function.
    vit["drop_path_rate"] = 0.0
    return Backbone(sd, vit, spec, source)
