"""DeepSpeed ZeRO 1/2/3 from a generated config dict; the engine owns backward, clipping,
accumulation and the step, and checkpoints with its own ``save_checkpoint``.

The optimizer is ours (``optimizer=`` client optimizer, parameter groups with their lr/wd
scales), so no DeepSpeed op is JIT-compiled. The engine skips a step by itself when the
gradient norm is not finite (bf16 ``check_grad_overflow``); ``was_step_applied`` reports it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..optim import OptimConfig
from ..safe_load import deepspeed_weights_only
from .base import StepResult, Strategy

TAG = "zero"


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def ds_config(self, optim_cfg: OptimConfig, micro_batch: int) -> dict:
        ds = self.cfg.deepspeed
        zero: dict = {"stage": ds.stage}
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": optim_cfg.accum_steps,
            "gradient_clipping": optim_cfg.clip_grad,
            "zero_optimization": zero,
            "bf16": {"enabled": self.cfg.precision == "bf16"},
            "zero_allow_untested_optimizer": True,  # our torch AdamW / LAMB
            "zero_force_ds_cpu_optimizer": False,  # offload with a torch optimizer, no cpu_adam build
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        return _deep_merge(config, dict(ds.extra))

    def setup(self, method: nn.Module, optim_cfg: OptimConfig, micro_batch: int) -> None:
        import deepspeed

        super().setup(method, optim_cfg, micro_batch)  # device, checkpointing, compile, our optimizer
        # The engine is DeepSpeed's data parallelism; it takes the optimizer, hence made here, not in wrap.
        self.module, self.optimizer, _, _ = deepspeed.initialize(
            model=method, optimizer=self.optimizer, config=self.ds_config(optim_cfg, micro_batch))
        self._last = True

    def wrap(self, method: nn.Module) -> nn.Module:
        return method  # wrapped by the engine in setup, once the optimizer exists

    def prepare_batch(self, batch: dict) -> dict:
        batch = super().prepare_batch(batch)
        if self.cfg.precision != "bf16":
            return batch
        return {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}

    def autocast(self):
        return contextlib.nullcontext()  # the engine holds bf16 parameters; inputs are cast

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        self._last = last
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss)  # the engine divides by gradient_accumulation_steps
        if not self._last:
            self.module.step()  # only advances the engine's micro-step counter

    def clip_and_step(self, max_norm: float, skip: bool) -> StepResult:
        # Clipping is in the engine's config (gradient_clipping); a non-finite loss makes the
        # gradients non-finite, which the engine refuses on its own.
        self.module.step()
        norm = self.module.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        return StepResult(norm, bool(self.module.was_step_applied()))

    def zero_grad(self) -> None:
        self.module.zero_grad()

    def save_checkpoint(self, path: Path, method_state: dict, async_save: bool = False):
        self.module.save_checkpoint(str(path), tag=TAG, save_latest=False)
        if method_state:
            torch.save(method_state, self._method_state_file(path))
        return None  # DeepSpeed has no asynchronous save here: always synchronous

    def load_checkpoint(self, path: Path, method_state: dict) -> dict:
        with deepspeed_weights_only():  # DeepSpeed itself would unpickle anything
            loaded, _ = self.module.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint with tag {TAG!r} under {path}")
        file = self._method_state_file(path)
        return torch.load(file, weights_only=True) if method_state and file.exists() else method_state

    def _method_state_file(self, path: Path) -> Path:
        """This rank's method state: the engine's files hold only the model and optimizer."""
        return Path(path) / f"method_rank{self.rank:05d}.pt"


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
