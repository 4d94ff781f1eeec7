"""The training loop: method + strategy + data + checkpoints + logging.

One loop for every strategy; recipes never branch on it. Per optimizer step: set the
scheduled lr / wd, run ``accum_steps`` micro-batches (forward + backward), all-reduce ONE small
vector (loss, metrics, stop flag) so every rank agrees on skipping and stopping, clip + step
(refused when the loss or gradient norm is not finite), ``method.after_step``, log, save.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from .checkpoint import CheckpointManager
from .config import TrainConfig, save_config
from .fault import SkipGuard, StopRequest
from .metrics import StepTimer
from .schedules import apply_schedules
from .strategies import Strategy

__all__ = ["Trainer", "TrainResult", "seed_everything"]

log = logging.getLogger(__name__)


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


class Trainer:
    def __init__(self, cfg: TrainConfig, method, strategy: Strategy, loader, logger=None):
        self.cfg, self.method, self.strategy, self.loader = cfg, method, strategy, loader
        self.run_dir = Path(cfg.run.dir)
        self.micro_batch = cfg.training_data.batch_size  # per rank
        self.global_batch = self.micro_batch * strategy.world_size * cfg.optim.accum_steps
        self.stop = StopRequest()
        self.guard = SkipGuard(cfg.fault.max_consecutive_skips)
        self.step = 0
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint, strategy)
        self.logger = logger
        self.save_stalls: list[float] = []  # seconds the loop was blocked by each save
        self.stats: dict[str, float] = {}  # this step's scheduled lr and wd
        self.window = _Window()
        self._dense_probe = None  # eval.dense's probe, made at the first evaluation
        self.timer = StepTimer(strategy.device, sync=cfg.log.phase_times)
        self._last_save = self._last_console = time.monotonic()
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
        latest = self.ckpt.dir.newest() if self.cfg.checkpoint.resume else None
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
        loaded = self.ckpt.load(path, self.method.method_state())
        self.method.load_method_state(loaded.method_state)
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
        self._last_save = self._last_console = time.monotonic()
        while self.step < total:
            stop, save_now = self._train_step(batches)
            self.step += 1
            self._log()
            self._evaluate()
            self.ckpt.poll()
            if stop:
                self._save(blocking=True)
                return self._result("preempted")
            if self.step < total and (save_now or (every and self.step % every == 0)):
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

    def _train_step(self, batches) -> tuple[bool, bool]:
        """One optimizer step; returns the flags every rank agreed on: (stop, save now).

        Loss and metrics stay on the device, summed into the log window, and are read only
        when a line is logged. The one host read per step is the non-finite check inside
        ``clip_and_step``: skipping the optimizer step and the EMA needs it.
        """
        s, optim_cfg, timer = self.strategy, self.cfg.optim, self.timer
        sched = apply_schedules(s.optimizer, self.step, optim_cfg, self.cfg.run.total_steps, self.global_batch)
        self.stats.update(lr=sched["lr"], wd=sched["wd"])
        accum = optim_cfg.accum_steps
        sums: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            with timer("data"):
                batch = s.prepare_batch(next(batches))
            with s.micro_step(last=micro == accum - 1):
                with timer("forward"):
                    loss, metrics = s.forward(batch, self.step)
                with timer("backward"):
                    s.backward(loss)
            # A metric lives where the loss lives, whatever device the method made it on.
            for k, v in {"loss": loss, **metrics}.items():
                v = v.detach().float().to(s.device)
                sums[k] = sums[k] + v if k in sums else v
        names = sorted(sums)
        with timer("collective"):
            # One collective for the step's loss and metrics (means over ranks and micro-batches),
            # and one on the CPU control group for the flags every rank must agree on.
            means = s.all_reduce(torch.stack([sums[k] for k in names])) / (accum * s.world_size)
            stop, save_now = s.agree([self.stop.requested, self._save_clock_due()])
        with timer("optimizer"):
            result = s.clip_and_step(optim_cfg.clip_grad or 0.0, skip=~torch.isfinite(means[names.index("loss")]))
        self.guard.update(self.step, result.applied, lambda: float(means[names.index("loss")]), result.grad_norm)
        if result.applied:
            with timer("ema"):
                self.method.after_step(self.step, s)
        self.window.add(dict(zip(names, means)), result.grad_norm, self.global_batch)
        return stop, save_now

    def _save_clock_due(self) -> bool:
        """Rank 0's clock says a time-based save is due (``checkpoint.every_minutes``)."""
        minutes = self.cfg.checkpoint.every_minutes
        return bool(minutes) and self.strategy.rank == 0 and time.monotonic() - self._last_save >= 60 * minutes

    # -- logging and saving ---------------------------------------------------------------
    def _log(self) -> None:
        """Log on every ``log.every``-th step, the first and the last, and on rank 0 whenever
        ``log.console_every_s`` passed without a line (nothing collective happens here)."""
        log_cfg, total = self.cfg.log, self.cfg.run.total_steps
        due = self.step % log_cfg.every == 0 or self.step in (1, total) or (
            self.strategy.rank == 0 and time.monotonic() - self._last_console >= log_cfg.console_every_s)
        if not due:
            return
        from .metrics import memory_stats, mfu

        w = self.window
        scalars = w.means()  # the host read of the window's device sums
        elapsed = w.elapsed()
        scalars.update({f"opt/{k}": self.stats[k] for k in ("lr", "wd")})
        scalars["fault/skipped_steps"] = float(self.guard.total)
        phases = self.timer.pop(steps=w.steps)
        if self.timer.exact:  # host times of an asynchronous device would only time the launches
            scalars.update(phases)
        scalars["perf/data_time_s"] = phases.get("perf/data_s", 0.0)
        scalars["perf/compute_time_s"] = max(elapsed / w.steps - scalars["perf/data_time_s"], 0.0)
        if self.flops_per_sample:
            flops = w.images / max(elapsed, 1e-9) * self.flops_per_sample
            scalars["perf/flops_per_s"] = flops
            if log_cfg.peak_flops > 0:
                scalars["perf/mfu"] = mfu(flops, log_cfg.peak_flops * self.strategy.world_size)
        scalars.update({f"memory/{k}": v for k, v in memory_stats(self.strategy.device).items()})
        loader_stats = self.loader.stats() if hasattr(self.loader, "stats") else {}
        if "bad_samples" in loader_stats:
            scalars["data/bad_samples"] = float(loader_stats["bad_samples"])
        if "epoch" in loader_stats:
            scalars["data/epoch"] = float(loader_stats["epoch"])
        if self.save_stalls:
            scalars["checkpoint/stall_s"] = self.save_stalls[-1]
        tokens = self.global_batch * self.tokens_per_sample if self.tokens_per_sample else None
        self.logger.log(self.step, scalars, images=self.global_batch, tokens=tokens, console=True)
        self._last_console = time.monotonic()
        w.reset()

    def _evaluate(self) -> None:
        every = self.cfg.eval.every
        if not every or (self.step % every and self.step != self.cfg.run.total_steps):
            return
        start = time.perf_counter()
        scalars = {f"eval/{k}": float(v) for k, v in self.method.evaluate(self.cfg.eval).items()}
        if self.cfg.eval.dense.enabled:
            scalars.update({f"eval/dense/{k}": v for k, v in self._evaluate_dense().items()})
        self.window.exclude(time.perf_counter() - start)  # rates and MFU are of training alone
        if scalars:
            scalars["eval/time_s"] = time.perf_counter() - start
            self.logger.log(self.step, scalars)
            log.info("step %d evaluation: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))

    def _evaluate_dense(self) -> dict[str, float]:
        """The linear segmentation probe on the method's evaluation backbone (every rank runs
        it: a sharded backbone's forward needs them all)."""
        from ..eval.dense import DenseProbe

        backbone = self.method.evaluation_backbone()
        if backbone is None:
            raise ValueError(f"eval.dense: method {self.cfg.method.name!r} names no evaluation backbone")
        if self._dense_probe is None:  # keeps its decoded images across evaluations
            self._dense_probe = DenseProbe(self.cfg.eval.dense)
        with self.method.root_unsharded():
            return self._dense_probe.evaluate(backbone, self.strategy.device)

    def _save(self, blocking: bool = False) -> None:
        state = {"samples_seen": self.step * self.global_batch, **self.guard.state_dict()}
        stall = self.ckpt.save(self.step, state, self.loader.state_dict(), self.method.method_state(),
                               async_save=False if blocking else None)
        self.save_stalls.append(stall)
        self.window.exclude(stall)
        self._last_save = time.monotonic()

    def _result(self, status: str) -> TrainResult:
        self.ckpt.wait()
        latest = self.ckpt.dir.newest()
        return TrainResult(status, self.step, str(latest) if latest else None, self.guard.total,
                           self.stop.signal_name if status == "preempted" else None)


class _Window:
    """Sums since the last log line: the step's mean loss and metrics and the gradient norm,
    kept as device tensors (reading them is the only host synchronization of logging), and
    the steps, images and wall time they cover."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps, self.images, self.start = 0, 0, time.perf_counter()
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, values: dict[str, torch.Tensor], grad_norm: torch.Tensor | float, images: int) -> None:
        values = {**values, "opt/grad_norm": torch.as_tensor(grad_norm, dtype=torch.float32)}
        for k, v in values.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.steps += 1
        self.images += images

    def means(self) -> dict[str, float]:
        names = list(self.sums)
        values = torch.stack([self.sums[k].to(self.sums[names[0]].device) for k in names]).tolist()
        return {k: v / self.steps for k, v in zip(names, values)}

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation, a checkpoint stall) out of the window's time."""
        self.start += seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
