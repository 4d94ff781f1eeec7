"""Weights-only loading of DeepSpeed's checkpoint files.

DeepSpeed opens its files with ``torch.load(..., weights_only=False)``, which runs any code a
crafted pickle carries. ``deepspeed_weights_only()`` swaps the ``torch`` that DeepSpeed's
loaders see for a proxy whose ``load`` is weights-only, allowing only the few plain data
holders DeepSpeed itself writes. Used by the deepspeed strategy's resume and by
``lspretrain.convert`` when it consolidates ZeRO checkpoints.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["deepspeed_weights_only"]


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
