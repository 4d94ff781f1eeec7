"""Checkpoint directories: atomic, complete-or-absent, keep-K + every-N, auto-resume.

Layout of ``RUN/checkpoints/``::

    step_00001000/              complete checkpoints only (renamed in when finished)
        COMPLETE.json           step, world size, strategy, time; written last, before the rename
        state/                  the strategy's files: DCP shards + .metadata, or DeepSpeed's
        rank/00000.pt           per rank: RNG states (torch, numpy, python, CUDA) as tensors
        data/00000.json         per rank: the data stream state (loader.state_dict())
    .tmp-step_00002000/         a save in progress (or one killed mid-way: removed at start-up)

Everything is written into ``.tmp-step_N`` and rank 0 renames it to ``step_N`` once every rank
has finished, so a directory named ``step_N`` is always complete. Loading reads tensors with
``weights_only=True`` or through DCP, and JSON: nothing is unpickled.
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import CheckpointConfig
from .strategies import Strategy

__all__ = ["CheckpointManager", "rng_state", "set_rng_state", "LoadedCheckpoint"]

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d+)$")


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
    meta: dict  # COMPLETE.json: step, world_size, trainer state
    method_state: dict
    data_states: list[dict]  # every saved rank's stream state


class CheckpointManager:
    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, strategy: Strategy):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg, self.strategy = cfg, strategy
        self.rank = strategy.rank
        self._pending: tuple | None = None  # (future, tmp dir, final dir, meta) of an async save

    # -- discovery ----------------------------------------------------------------------
    def complete(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for d in self.root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / "COMPLETE.json").is_file():
                found.append((int(m.group(1)), d))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1][1] if found else None

    def clean_stale(self) -> None:
        """Remove temp dirs of saves that never finished (the process died mid-save)."""
        if self.rank == 0 and self.root.is_dir():
            for d in self.root.glob(".tmp-step_*"):
                log.warning("removing incomplete checkpoint %s", d)
                shutil.rmtree(d, ignore_errors=True)
        self.strategy.barrier()

    # -- save ---------------------------------------------------------------------------
    def save(self, step: int, trainer_state: dict, data_state: dict, method_state: dict, async_save: bool | None = None) -> float:
        """Save at ``step`` (collective); returns the seconds the caller was blocked."""
        t0 = time.perf_counter()
        self.wait()  # one save in flight at a time
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-step_{step:08d}"
        for sub in ("rank", "data"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), tmp / "rank" / f"{self.rank:05d}.pt")
        (tmp / "data" / f"{self.rank:05d}.json").write_text(json.dumps(data_state))
        meta = {"step": step, "world_size": self.strategy.world_size, "strategy": self.strategy.name,
                "time": time.time(), **trainer_state}
        use_async = self.cfg.async_save if async_save is None else async_save
        future = self.strategy.save_checkpoint(tmp / "state", method_state, async_save=use_async)
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
        (tmp / "COMPLETE.json").write_text(json.dumps(meta, indent=1))
        if final.exists():  # a re-save of the same step (resumed run): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        self._prune()
        log.info("checkpoint %s complete", final)

    def _prune(self) -> None:
        found = self.complete()
        keep = {s for s, _ in found[-self.cfg.keep_last:]}
        if self.cfg.keep_every:
            keep |= {s for s, _ in found if s % self.cfg.keep_every == 0}
        for s, d in found:
            if s not in keep:
                shutil.rmtree(d, ignore_errors=True)

    # -- load ---------------------------------------------------------------------------
    def load(self, path: Path, method_template: dict) -> LoadedCheckpoint:
        meta = json.loads((path / "COMPLETE.json").read_text())
        method_state = self.strategy.load_checkpoint(path / "state", method_template)
        data_states = [json.loads(f.read_text()) for f in sorted((path / "data").glob("*.json"))]
        if len(data_states) != meta["world_size"]:
            raise RuntimeError(f"{path}: {len(data_states)} data stream states for world size {meta['world_size']}")
        if meta["world_size"] == self.strategy.world_size:
            set_rng_state(torch.load(path / "rank" / f"{self.rank:05d}.pt", weights_only=True))
        # On another world size the per-rank RNG streams cannot continue; the trainer reseeds.
        return LoadedCheckpoint(path, meta, method_state, data_states)
