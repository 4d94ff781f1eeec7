"""The training loop: method + strategy + data + checkpoints + logging.

One loop for every strategy; recipes never branch on it. Per optimizer step: set the
scheduled lr / wd, run ``accum_steps`` micro-batches (forward + backward), all-reduce ONE small
vector (loss, metrics, stop flag) so every rank agrees on skipping and stopping, clip + step
(refused when the loss or gradient norm is not finite), ``method.after_step``, log, save.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from .checkpoint import CheckpointManager
from .config import TrainConfig, save_config
from .fault import SkipGuard, StopRequest
from .schedules import apply_schedules
from .strategies import Strategy

__all__ = ["Trainer", "TrainResult", "seed_everything", "per_rank_batch"]

log = logging.getLogger(__name__)
_OPT_KEYS = ("lr", "wd", "grad_norm")


@dataclass
class TrainResult:
    status: Literal["completed", "preempted"]
    step: int
    checkpoint: str | None  # newest complete checkpoint
    skipped_steps: int
    reason: str | None = None  # what stopped a preempted run (signal name, request_stop())


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def per_rank_batch(cfg: TrainConfig) -> int:
    return cfg.synthetic.batch_size if cfg.data_source == "synthetic" else cfg.data.batch_size


class Trainer:
    def __init__(self, cfg: TrainConfig, method, strategy: Strategy, loader, logger=None):
        self.cfg, self.method, self.strategy, self.loader = cfg, method, strategy, loader
        method.total_steps = cfg.run.total_steps
        self.run_dir = Path(cfg.run.dir)
        self.micro_batch = per_rank_batch(cfg)
        self.global_batch = self.micro_batch * strategy.world_size * cfg.optim.accum_steps
        self.stop = StopRequest()
        self.guard = SkipGuard(cfg.fault.max_consecutive_skips)
        self.step = 0
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint, strategy)
        self.logger = logger
        self.save_stalls: list[float] = []  # seconds the loop was blocked by each save
        strategy.setup(method, cfg.optim, self.micro_batch)
        self.flops_per_sample = method.train_flops_per_sample()
        self.tokens_per_sample = method.tokens_per_sample()

    def request_stop(self) -> None:
        """Ask the loop to finish the current step, save and return "preempted" (thread-safe:
        only sets a flag; launchers call it from their own signal handlers)."""
        self.stop.request()

    # -- set-up -------------------------------------------------------------------------
    def _start(self) -> None:
        if self.strategy.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
        self.ckpt.clean_stale()
        latest = self.ckpt.latest() if self.cfg.checkpoint.resume else None
        if latest is None:
            seed_everything(self.cfg.run.seed * 1000 + self.strategy.rank)
        else:
            self._resume(latest)
        if self.logger is None:
            from .metrics import MetricLogger

            self.logger = MetricLogger(self.run_dir, self.strategy.rank, self.cfg.run.total_steps,
                                       log_every=self.cfg.log.every, tensorboard=self.cfg.log.tensorboard,
                                       purge_step=self.step + 1 if self.step else None)

    def _resume(self, path: Path) -> None:
        loaded = self.ckpt.load(path, self.method.extra_state_dict())
        self.method.load_extra_state_dict(loaded.method_state)
        self.step = loaded.meta["step"]
        self.guard.load_state_dict(loaded.meta)
        same_world = loaded.meta["world_size"] == self.strategy.world_size
        self.loader.load_state_dict(loaded.data_states[self.strategy.rank] if same_world else loaded.data_states)
        if not same_world:  # per-rank RNG streams cannot continue on another world size
            seed_everything((self.cfg.run.seed * 1000 + self.strategy.rank) * 1_000_003 + self.step)
        log.info("resumed from %s at step %d (saved on %d ranks)", path, self.step, loaded.meta["world_size"])

    # -- the loop -----------------------------------------------------------------------
    def fit(self) -> TrainResult:
        self._start()
        installed = self.cfg.fault.handle_signals and self.stop.install()
        try:
            return self._loop()
        finally:
            self.ckpt.wait()
            if installed:
                self.stop.uninstall()
            self.logger.close()

    def _loop(self) -> TrainResult:
        total, every = self.cfg.run.total_steps, self.cfg.checkpoint.every
        batches = self._batches()
        window = _Window()
        while self.step < total:
            stats, stop = self._train_step(batches, window)
            self.step += 1
            self._log(stats, window)
            self._evaluate()
            self.ckpt.poll()
            if stop:
                self._save(blocking=True)
                return self._result("preempted")
            if every and self.step % every == 0 and self.step < total:
                self._save()
        if self.cfg.checkpoint.save_final:
            self._save(blocking=True)
        return self._result("completed")

    def _batches(self) -> Iterator[dict]:
        """The loader's batches without end: an epoch-mode loader ends each epoch, and a new
        ``iter()`` starts the next one (its state moves on by itself)."""
        while True:
            empty = True
            for batch in self.loader:
                empty = False
                yield batch
            if empty:
                raise RuntimeError("the data loader gave no batch for a whole epoch: fewer samples per rank "
                                   "than data.batch_size with data.drop_last=true?")

    def _train_step(self, batches, window: "_Window") -> tuple[dict[str, float], bool]:
        s, optim_cfg = self.strategy, self.cfg.optim
        t_start = time.perf_counter()
        sched = apply_schedules(s.optimizer, self.step, optim_cfg, self.cfg.run.total_steps, self.global_batch)
        accum, data_time = optim_cfg.accum_steps, 0.0
        loss_sum, metric_sums = torch.zeros((), device=s.device), {}
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = s.prepare_batch(next(batches))
            data_time += time.perf_counter() - t0
            with s.micro_step(last=micro == accum - 1):
                loss, metrics = s.forward(batch, self.step)
                s.backward(loss)
            loss_sum += loss.detach().float()
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v.detach().float()
        names = sorted(metric_sums)
        # One collective per step: the mean loss and metrics, and the stop flag (any rank).
        vec = torch.stack([loss_sum, *(metric_sums[k] for k in names),
                           torch.tensor(float(self.stop.requested), device=s.device)]) / accum
        vec = s.all_reduce(vec)
        values = (vec[:-1] / s.world_size).tolist()
        loss_value, stop = values[0], vec[-1].item() > 0
        result = s.clip_and_step(optim_cfg.clip_grad or 0.0, skip=not math.isfinite(loss_value))
        self.guard.update(self.step, result.applied, loss_value, result.grad_norm)
        if result.applied:
            self.method.after_step(self.step, s)
        if s.device.type == "cuda":
            torch.cuda.synchronize(s.device)
        step_time = time.perf_counter() - t_start
        window.add(step_time, data_time, self.global_batch)
        stats = {"loss": loss_value, **dict(zip(names, values[1:])), "lr": sched["lr"], "wd": sched["wd"],
                 "grad_norm": result.grad_norm, "fault/skipped_steps": float(self.guard.total)}
        return stats, stop

    # -- logging and saving ---------------------------------------------------------------
    def _log(self, stats: dict[str, float], window: "_Window") -> None:
        if self.step % self.cfg.log.every and self.step not in (1, self.cfg.run.total_steps):
            return
        from .metrics import memory_stats

        scalars = {k: v for k, v in stats.items() if k not in _OPT_KEYS}
        scalars.update({f"opt/{k}": stats[k] for k in _OPT_KEYS})
        scalars["perf/data_time_s"] = window.data / window.steps
        scalars["perf/compute_time_s"] = (window.time - window.data) / window.steps
        if self.flops_per_sample:
            flops = window.images / max(window.time, 1e-9) * self.flops_per_sample
            scalars["perf/flops_per_s"] = flops
            if self.cfg.log.peak_flops > 0:
                scalars["perf/mfu"] = flops / (self.cfg.log.peak_flops * self.strategy.world_size)
        scalars.update({f"memory/{k}": v for k, v in memory_stats(self.strategy.device).items()})
        loader_stats = self.loader.stats() if hasattr(self.loader, "stats") else {}
        if "bad_samples" in loader_stats:
            scalars["data/bad_samples"] = float(loader_stats["bad_samples"])
        if "epoch" in loader_stats:
            scalars["data/epoch"] = float(loader_stats["epoch"])
        if self.save_stalls:
            scalars["checkpoint/stall_s"] = self.save_stalls[-1]
        tokens = self.global_batch * self.tokens_per_sample if self.tokens_per_sample else None
        self.logger.log(self.step, scalars, images=self.global_batch, tokens=tokens)
        window.reset()

    def _evaluate(self) -> None:
        every = self.cfg.eval.every
        if not every or (self.step % every and self.step != self.cfg.run.total_steps):
            return
        start = time.perf_counter()
        scalars = {f"eval/{k}": float(v) for k, v in self.method.evaluate(self.cfg, self.strategy).items()}
        if scalars:
            scalars["eval/time_s"] = time.perf_counter() - start
            self.logger.log(self.step, scalars)
            log.info("step %d evaluation: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))

    def _save(self, blocking: bool = False) -> None:
        state = {"samples_seen": self.step * self.global_batch, **self.guard.state_dict()}
        stall = self.ckpt.save(self.step, state, self.loader.state_dict(), self.method.extra_state_dict(),
                               async_save=False if blocking else None)
        self.save_stalls.append(stall)

    def _result(self, status: str) -> TrainResult:
        self.ckpt.wait()
        latest = self.ckpt.latest()
        return TrainResult(status, self.step, str(latest) if latest else None, self.guard.total,
                           self.stop.signal_name if status == "preempted" else None)


class _Window:
    """Time and images since the last log line (rates are averaged over it)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps, self.time, self.data, self.images = 0, 0.0, 0.0, 0

    def add(self, step_time: float, data_time: float, images: int) -> None:
        self.steps += 1
        self.time += step_time
        self.data += data_time
        self.images += images
