"""Checkpoint directories: atomic, complete-or-absent, keep-K + every-N, auto-resume.

The layout (``step_N`` directories, the ``COMPLETE.json`` marker, the temp directory renamed
when every rank has finished) is ``checkpoint_layout.CheckpointDir``'s. Loading reads tensors with
``weights_only=True`` or through DCP, and JSON: nothing is unpickled.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint_layout import CheckpointDir
from .config import CheckpointConfig
from .strategies import Strategy

__all__ = ["CheckpointManager", "rng_state", "set_rng_state", "LoadedCheckpoint"]

log = logging.getLogger(__name__)


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]), "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4]),
        "python": torch.tensor(py_state[1], dtype=torch.int64),
        "python_version": int(py_state[0]),
        "python_gauss": -1.0 if py_state[2] is None else float(py_state[2]),
        "python_has_gauss": py_state[2] is not None,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    gauss = state["python_gauss"] if state["python_has_gauss"] else None
    random.setstate((state["python_version"], tuple(int(x) for x in state["python"].tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class LoadedCheckpoint:
    path: Path
    meta: dict  # the completion marker: step, world_size, trainer state
    method_state: dict
    data_states: list[dict]  # every saved rank's stream state


class CheckpointManager:
    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, strategy: Strategy):
        self.dir = CheckpointDir.of_run(run_dir)
        self.cfg, self.strategy = cfg, strategy
        self.rank = strategy.rank
        self._pending: tuple | None = None  # (future, tmp dir, final dir, meta) of an async save

    # -- start-up -----------------------------------------------------------------------
    def clean_stale(self) -> None:
        """Remove temp dirs of saves that never finished (the process died mid-save)."""
        if self.rank == 0:
            for d in self.dir.stale_temps():
                log.warning("removing incomplete checkpoint %s", d)
                shutil.rmtree(d, ignore_errors=True)
        self.strategy.barrier()

    # -- save ---------------------------------------------------------------------------
    def save(self, step: int, trainer_state: dict, data_state: dict, method_state: dict, async_save: bool | None = None) -> float:
        """Save at ``step`` (collective); returns the seconds the caller was blocked."""
        t0 = time.perf_counter()
        self.wait()  # one save in flight at a time
        final, tmp = self.dir.step_path(step), self.dir.temp_path(step)
        rng_file, data_file = CheckpointDir.rng_file(tmp, self.rank), CheckpointDir.data_state_file(tmp, self.rank)
        for f in (rng_file, data_file):
            f.parent.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), rng_file)
        data_file.write_text(json.dumps(data_state))
        meta = {"step": step, "world_size": self.strategy.world_size, "strategy": self.strategy.name,
                "time": time.time(), **trainer_state}
        use_async = self.cfg.async_save if async_save is None else async_save
        future = self.strategy.save_checkpoint(CheckpointDir.state_dir(tmp), method_state, async_save=use_async)
        if future is None:
            self.strategy.barrier()
            self._finalize(tmp, final, meta)
            self.strategy.barrier()
        else:
            self._pending = (future, tmp, final, meta)
        return time.perf_counter() - t0

    def poll(self) -> None:
        """Finish an asynchronous save if its writes are done (cheap; call every step)."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Block until the asynchronous save in flight (if any) is complete and renamed."""
        if self._pending is None:
            return
        future, tmp, final, meta = self._pending
        self._pending = None
        future.result()  # rank 0's future ends after every rank's shards and the metadata are written
        self._finalize(tmp, final, meta)

    def _finalize(self, tmp: Path, final: Path, meta: dict) -> None:
        if self.rank != 0:
            return
        CheckpointDir.finalize(tmp, final, meta)
        self._prune()
        log.info("checkpoint %s complete", final)

    def _prune(self) -> None:
        found = self.dir.complete_steps()
        keep = {s for s, _ in found[-self.cfg.keep_last:]}
        if self.cfg.keep_every:
            keep |= {s for s, _ in found if s % self.cfg.keep_every == 0}
        for s, d in found:
            if s not in keep:
                shutil.rmtree(d, ignore_errors=True)

    # -- load ---------------------------------------------------------------------------
    def load(self, path: Path, method_state: dict) -> LoadedCheckpoint:
        """Load ``path`` in place; ``method_state`` is the method's current state, the template
        the saved one is loaded into (it may hold DTensors)."""
        meta = CheckpointDir.read_meta(path)
        method_state = self.strategy.load_checkpoint(CheckpointDir.state_dir(path), method_state)
        data_states = [json.loads(f.read_text()) for f in CheckpointDir.data_state_files(path)]
        if len(data_states) != meta["world_size"]:
            raise RuntimeError(f"{path}: {len(data_states)} data stream states for world size {meta['world_size']}")
        if meta["world_size"] == self.strategy.world_size:
            set_rng_state(torch.load(CheckpointDir.rng_file(path, self.rank), weights_only=True))
        # On another world size the per-rank RNG streams cannot continue; the trainer reseeds.
        return LoadedCheckpoint(path, meta, method_state, data_states)
