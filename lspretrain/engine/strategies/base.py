"""The Strategy interface: everything the trainer loop does that depends on how the model is
distributed. ``single``, ``ddp`` and ``fsdp2`` share this base (torch optimizer, DCP
checkpoints); ``deepspeed`` overrides the parts its engine owns.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..config import StrategyConfig
from ..dist import DistEnv
from ..optim import OptimConfig, build_optimizer, param_groups
from ..parallelize import parallelize
from ..safe_load import dcp_load, single_process_dcp_quiet

__all__ = ["Strategy", "StepResult"]


@dataclass
class StepResult:
    grad_norm: float  # before clipping; inf/nan when the step was refused
    applied: bool


def local_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """This rank's storage of a parameter: a DTensor's local shard, a ZeRO-3 partition (plus
    the full copy ZeRO-3 keeps of small "persistent" parameters), or the tensor itself."""
    if hasattr(t, "to_local"):
        return [t.to_local()]
    if hasattr(t, "ds_tensor"):
        return [t.ds_tensor, t.data] if getattr(t, "ds_persist", False) else [t.ds_tensor]
    return [t.data]


class Strategy:
    name = "base"

    def __init__(self, cfg: StrategyConfig, env: DistEnv, device: torch.device):
        self.cfg, self.env, self.device = cfg, env, device
        self.method: nn.Module | None = None
        self.module: nn.Module | None = None  # what forward is called on (may be a wrapper)
        self.optimizer: torch.optim.Optimizer | None = None
        self.accum_steps = 1
        self._ckpt_group = None
        self._control_group = None

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    # -- set-up -------------------------------------------------------------------------
    def setup(self, method: nn.Module, optim_cfg: OptimConfig, micro_batch: int) -> None:
        """Distribute ``method`` (activation checkpointing and compile, then this strategy's data
        parallelism) and build the optimizer over its optimized parameters (``micro_batch``:
        samples per rank per micro-step)."""
        self.method = method.to(self.device)
        self.accum_steps = optim_cfg.accum_steps
        parallelize(method, self.cfg)
        self.module = self.wrap(method)
        # Built after wrap: fully_shard replaces the parameters with the sharded ones it must hold.
        groups = param_groups(method.optimized_module(), optim_cfg, method.num_layers())
        self.optimizer = build_optimizer(groups, optim_cfg)
        if dist.is_initialized():
            # Async checkpoint collectives run in a background thread: keep them off the
            # group the training step uses.
            self._ckpt_group = dist.new_group(backend="gloo")

    def wrap(self, method: nn.Module) -> nn.Module:
        """This strategy's data parallelism over ``method``; returns what forward is called on."""
        raise NotImplementedError

    # -- one step -----------------------------------------------------------------------
    def prepare_batch(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        """Context of one micro-batch's forward + backward; gradients are synchronized only
        on the ``last`` micro-batch of an accumulation."""
        yield

    def forward(self, batch: dict, step: int):
        with self.autocast():
            return self.module(batch, step)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum_steps).backward()

    def clip_and_step(self, max_norm: float, skip: bool | torch.Tensor) -> StepResult:
        """Clip to ``max_norm`` (0: no clipping, norm still measured) and step, unless ``skip``
        (a bool or a device tensor: the loss was not finite) or the gradient norm is not
        finite; every rank sees the same norm and loss, so all agree. Reading the norm is the
        step's one host synchronization."""
        params = [p for p in self.method.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        norm, skip = torch.stack([norm.float(), torch.as_tensor(skip, device=norm.device).float()]).tolist()
        applied = not skip and math.isfinite(norm)
        if applied:
            self.optimizer.step()
        self.zero_grad()
        return StepResult(norm, applied)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # -- collectives --------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if dist.is_initialized():
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return tensor

    def agree(self, flags: list[bool]) -> list[bool]:
        """Each flag true on any rank -> true on every rank (a CPU all-reduce, no device sync)."""
        if not dist.is_initialized():
            return [bool(f) for f in flags]
        if self._control_group is None:  # made at the first call, which every rank makes together
            # The flags (stop, save) are host booleans: a CPU group reduces them without
            # touching the training device's stream.
            self._control_group = dist.new_group(backend="gloo")
        t = torch.tensor([float(f) for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control_group)
        return [bool(v > 0) for v in t.tolist()]

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    # -- EMA ----------------------------------------------------------------------------
    @torch.no_grad()
    def ema_update(self, target: nn.Module, source: nn.Module, momentum: float) -> None:
        """``target = momentum * target + (1 - momentum) * source``, parameter by parameter, on
        the local shards (both modules are sharded alike), so nothing is gathered."""
        t = [x for p in target.parameters() for x in local_tensors(p)]
        s = [x for p in source.parameters() for x in local_tensors(p)]
        if len(t) != len(s):
            raise ValueError(f"ema_update: target has {len(t)} parameters, source {len(s)}")
        torch._foreach_lerp_(t, [x.to(y.dtype) for x, y in zip(s, t)], 1.0 - momentum)

    # -- checkpoint ---------------------------------------------------------------------
    def _app_state(self, method_state: dict) -> dict:
        model, optim = get_state_dict(self.method, self.optimizer)
        return {"model": model, "optim": optim, "method": method_state}

    def save_checkpoint(self, path: Path, method_state: dict, async_save: bool = False):
        """Write model, optimizer and method state under ``path`` (collective). Returns a
        future when ``async_save`` (the state is staged before this returns), else None."""
        state = self._app_state(method_state)
        with single_process_dcp_quiet():
            if async_save:
                return dcp.async_save(state, checkpoint_id=str(path), process_group=self._ckpt_group)
            dcp.save(state, checkpoint_id=str(path), process_group=self._ckpt_group)
        return None

    def load_checkpoint(self, path: Path, method_state: dict) -> dict:
        """Load in place (resharding to this world size as needed); returns the method state."""
        state = self._app_state(method_state)
        dcp_load(state, path, process_group=self._ckpt_group)  # refuses a checkpoint that carries code
        set_state_dict(self.method, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return state["method"]

    def close(self) -> None:
        pass
