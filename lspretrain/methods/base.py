"""The Method protocol: what the trainer needs from a training method (DeiT-III, DINOv2, ...).

A method is an ``nn.Module`` that owns its modules: the student backbone and heads, and an
optional teacher that the optimizer never sees. It does not know which strategy runs it.

One step, as the trainer drives it::

    batch = strategy.prepare_batch(next(loader))        # device + dtype
    loss, metrics = method_wrapped(batch, step)         # forward(): teacher -> student -> losses
    strategy.backward(loss); strategy.clip_and_step(...)
    method.after_step(step, strategy)                   # e.g. teacher EMA via strategy.ema_update

``forward`` is split the dinov3 way: ``get_teacher_output`` (no grad; None without a teacher),
``get_student_output`` and ``compute_losses``; a method overrides the three parts, not forward.

The data loader (``build_loader``) must be iterable of batch dicts and have ``state_dict()``
(a plain JSON-able dict), ``load_state_dict(state)`` and ``stats()``. ``load_state_dict`` gets
this rank's saved state when the world size is unchanged, and the list of every saved rank's
state when the checkpoint comes from another world size.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ..data.config import DataConfig
from ..engine.config import EvalConfig, ModelConfig, SyntheticDataConfig

__all__ = ["Method", "StatefulLoader"]

StatefulLoader = Iterable[dict]  # + state_dict(), load_state_dict(state), stats(); see above


class Method(nn.Module):
    """``cfg``: the ``method`` config section (its dataclass in ``methods/configs.py``, paired with
    the class in ``registry.METHODS``); ``total_steps``: the run's length in optimizer steps, for
    the method's own schedules (DINOv2's teacher momentum)."""

    def __init__(self, cfg: Any, model_cfg: ModelConfig, total_steps: int):
        super().__init__()
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.total_steps = total_steps

    # -- what the strategy needs --------------------------------------------------------
    def sharded_modules(self) -> list[nn.Module]:
        """Backbones whose ``.blocks`` are the FSDP units / activation-checkpointing units
        (student and teacher alike); everything else goes into the root unit."""
        raise NotImplementedError

    def optimized_module(self) -> nn.Module:
        """The module whose parameters the optimizer updates (the student and its heads)."""
        return self

    def num_layers(self) -> int:
        """Depth used by layer-wise lr decay."""
        return len(self.sharded_modules()[0].blocks)

    # -- the step -----------------------------------------------------------------------
    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            teacher = self.get_teacher_output(batch, step)
        student = self.get_student_output(batch, step)
        return self.compute_losses(teacher, student, batch, step)

    def get_teacher_output(self, batch: dict, step: int) -> Any:
        return None

    def get_student_output(self, batch: dict, step: int) -> Any:
        raise NotImplementedError

    def compute_losses(self, teacher: Any, student: Any, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and named scalars (loss components, accuracies) to log."""
        raise NotImplementedError

    def after_step(self, step: int, strategy) -> None:
        """Called after every applied optimizer step (teacher EMA, center updates...)."""

    @contextlib.contextmanager
    def root_unsharded(self) -> Iterator[None]:
        """For calling a sub-module outside ``forward`` (evaluation): under fsdp2 the root
        unit's parameters (embeddings, final norms, heads) are gathered only inside the
        root's forward, so gather them here; the blocks gather their own as they run."""
        sharded = hasattr(self, "unshard") and hasattr(self, "reshard")  # an FSDPModule
        if sharded:
            self.unshard()
        try:
            yield
        finally:
            if sharded:
                self.reshard()

    def evaluation_backbone(self) -> nn.Module | None:
        """The backbone whose frozen features evaluations probe (``eval.dense``); None: none."""
        return None

    def evaluate(self, eval_cfg: EvalConfig) -> dict[str, float]:
        """Periodic evaluation (``eval.every`` steps) -> scalars logged under ``eval/``. Called
        on every rank (sharded forwards need them all); rank 0's values are logged."""
        return {}

    # -- checkpoint ---------------------------------------------------------------------
    def method_state(self) -> dict[str, torch.Tensor]:
        """State outside the module's parameters and buffers (tensors only); under fsdp2 it
        may hold DTensors, which the checkpoint reshards like the model."""
        return {}

    def load_method_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    # -- data and accounting ------------------------------------------------------------
    def build_loader(self, data: DataConfig | SyntheticDataConfig, run_device: str, rank: int,
                     world_size: int) -> StatefulLoader:
        """The loader of the run's training data (``TrainConfig.training_data``) with this method's
        transform and collate; ``run_device`` (``run.device``) says where batched photometrics may run."""
        raise NotImplementedError

    def train_flops_per_sample(self) -> float | None:
        """FLOPs of forward + backward for one sample (for FLOP/s and MFU); None: unknown."""
        return None

    def tokens_per_sample(self) -> int | None:
        return None
