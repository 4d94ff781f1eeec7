"""Loading checkpoints without running code a crafted file carries.

DeepSpeed opens its files with ``torch.load(..., weights_only=False)``, which runs any code a
crafted pickle carries. ``deepspeed_weights_only()`` swaps the ``torch`` that DeepSpeed's
loaders see for a proxy whose ``load`` is weights-only, allowing only the few plain data
holders DeepSpeed itself writes. Used by the deepspeed strategy's resume and by
``lspretrain.convert`` when it consolidates ZeRO checkpoints.

torch.distributed.checkpoint (DCP) unpickles its ``.metadata`` file with plain ``pickle.load``
and the non-tensor values of a state dict with ``torch.load(..., weights_only=False)``.
``SafeFileSystemReader`` reads the metadata through an unpickler that knows only DCP's own
metadata classes, torch sizes/dtypes/layouts, paths and plain containers, and checks every
non-tensor value weights-only before DCP unpickles it. ``read_dcp_metadata`` and ``dcp_load``
are the one way DCP checkpoints are read: resume (``Strategy.load_checkpoint``), a
classifier's ``init_from``/``init_head`` and every converter.
"""
from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

__all__ = ["SafeFileSystemReader", "UnsafeCheckpointError", "dcp_load", "deepspeed_weights_only", "read_dcp_metadata",
           "single_process_dcp_quiet"]


class _WeightsOnlyTorch:
    """``torch``, except that ``load`` is weights-only."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, mmap=None, weights_only=None, **kwargs):
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        # Plain data holders (an enum, a namedtuple-like record, a few scaler numbers): allowing
        # them lets no callable from the file run.
        with torch.serialization.safe_globals([ZeroStageEnum, fragment_address, LossScaler]):
            return torch.load(f, map_location=map_location, mmap=mmap, weights_only=True)


@contextlib.contextmanager
def deepspeed_weights_only() -> Iterator[None]:
    """Within this block, every file DeepSpeed's engine or ``zero_to_fp32`` loads is loaded
    weights-only; a file holding more than weights raises ``pickle.UnpicklingError``."""
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine
    from deepspeed.utils import zero_to_fp32

    modules = (torch_checkpoint_engine, zero_to_fp32)
    originals = [m.torch for m in modules]
    for m in modules:
        m.torch = _WeightsOnlyTorch()
    try:
        yield
    finally:
        for m, original in zip(modules, originals):
            m.torch = original


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file that holds more than data: loading it could run code."""


# Everything a DCP .metadata file holds (found by unpickling the metadata of single-process and
# fsdp2 saves, classification and DINOv2, sync and async): DCP's metadata dataclasses, the storage
# record of its file system writer, torch.Size, dtypes and layouts, and the checkpoint's path.
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    # Maps a layout's name to the torch.layout object (what torch's own weights-only loader allows).
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "pathlib._local": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # Python 3.13+
    "builtins": {"set", "frozenset", "list", "dict", "tuple", "int", "float", "complex", "bool", "str", "bytes",
                 "bytearray"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if name in _DCP_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.path}: refused to unpickle {module}.{name}: DCP metadata holds only "
            "torch.distributed.checkpoint's metadata classes and plain data, and this global could run code"
        )


class _WeightsOnlyBytes:
    """A load planner whose non-tensor values must pass ``torch.load(weights_only=True)``
    before the planner itself unpickles them (DCP's default planner loads them unrestricted)."""

    def __init__(self, planner, reader: "SafeFileSystemReader"):
        self._planner, self._reader = planner, reader

    def __getattr__(self, name: str):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            where = Path(self._reader.path) / self._reader.storage_data[read_item.storage_index].relative_path
            lines = str(err).strip().splitlines()
            why = next((line for line in lines if "GLOBAL" in line), lines[0])  # names the refused global
            raise UnsafeCheckpointError(
                f"{where}: refused to unpickle the value of {read_item.dest_index.fqn!r}: it holds objects outside "
                f"torch's weights-only allow-list and could run code ({why})"
            ) from None
        value.seek(0)
        self._planner.load_bytes(read_item, value)


class SafeFileSystemReader(FileSystemReader):
    """DCP's file system reader, except that nothing it unpickles can run code."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path}: not DCP metadata (holds a {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # what FileSystemReader.read_metadata sets
        return metadata

    def read_data(self, plan, planner):
        return super().read_data(plan, _WeightsOnlyBytes(planner, self))


def read_dcp_metadata(path: str | Path) -> Metadata:
    """The metadata of the DCP checkpoint directory ``path``; raises ``UnsafeCheckpointError``
    (naming the file and the refused global) when it holds anything else."""
    return SafeFileSystemReader(str(path)).read_metadata()


@contextlib.contextmanager
def single_process_dcp_quiet() -> Iterator[None]:
    """DCP save/load without torch's "torch.distributed is disabled ... assuming ... a single
    process" warning: one process with no group is exactly what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def dcp_load(state: dict, path: str | Path, process_group=None, no_dist: bool = False) -> None:
    """``dcp.load(state, ...)`` from the directory ``path`` through ``SafeFileSystemReader``."""
    import torch.distributed.checkpoint as dcp

    reader = SafeFileSystemReader(str(path))
    # Refuse here, on every rank alike: inside dcp.load a failed metadata read is logged, retried
    # as a per-rank file and re-raised wrapped in the collective's error report.
    reader.read_metadata()
    try:
        with single_process_dcp_quiet():
            dcp.load(state, storage_reader=reader, process_group=process_group, no_dist=no_dist)
    except CheckpointException as err:  # a refused value: raise the refusal, not DCP's per-rank report
        refusal = next((exc for exc, _ in err.failures.values() if isinstance(exc, UnsafeCheckpointError)), None)
        if refusal is None:
            raise
        raise refusal from None
