"""The on-disk layout of a run's checkpoints: the one module that knows it (the engine writes
and resumes through it, the converters and ``method.init_head`` read through it).

Layout of ``RUN/checkpoints/``::

    step_00001000/              complete checkpoints only (renamed in when finished)
        COMPLETE.json           step, world size, strategy, time; written last, before the rename
        state/                  the strategy's files: DCP shards + .metadata, or DeepSpeed's
        rank/00000.pt           per rank: RNG states (torch, numpy, python, CUDA) as tensors
        data/00000.json         per rank: the data stream state (loader.state_dict())
    .tmp-step_00002000/         a save in progress (or one killed mid-way: removed at start-up)

Everything is written into ``.tmp-step_N`` and renamed to ``step_N`` once every rank has
finished, so a directory named ``step_N`` is always complete. Light on imports: readers of
checkpoints use it without the engine's distributed machinery.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

__all__ = ["CheckpointDir"]

_STEP_DIR = re.compile(r"^step_(\d+)$")
_MARKER = "COMPLETE.json"
_TEMP_PREFIX = ".tmp-"


class CheckpointDir:
    """``RUN/checkpoints/``: its complete steps and the paths inside one step directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def of_run(cls, run_dir: str | Path) -> "CheckpointDir":
        return cls(Path(run_dir) / "checkpoints")

    # -- the step directories -----------------------------------------------------------
    def step_path(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def temp_path(self, step: int) -> Path:
        """Where the save of ``step`` is written before ``finalize`` renames it."""
        return self.root / f"{_TEMP_PREFIX}{self.step_path(step).name}"

    def complete_steps(self) -> list[tuple[int, Path]]:
        """(step, directory) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), d) for d in self.root.iterdir()
                 if (m := _STEP_DIR.match(d.name)) and (d / _MARKER).is_file()]
        return sorted(found)

    def newest(self) -> Path | None:
        found = self.complete_steps()
        return found[-1][1] if found else None

    def stale_temps(self) -> list[Path]:
        """Temp directories of saves that never finished (the process died mid-save)."""
        return sorted(self.root.glob(f"{_TEMP_PREFIX}step_*")) if self.root.is_dir() else []

    @staticmethod
    def finalize(temp: Path, final: Path, meta: dict) -> None:
        """Mark ``temp`` complete (``meta`` in the marker, written last) and rename it to
        ``final``, replacing an earlier save of the same step (a resumed run)."""
        (temp / _MARKER).write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        temp.rename(final)

    # -- inside one step directory --------------------------------------------------------
    @staticmethod
    def read_meta(step_dir: Path) -> dict:
        return json.loads((step_dir / _MARKER).read_text())

    @staticmethod
    def state_dir(step_dir: Path) -> Path:
        """The strategy's own files (DCP or DeepSpeed)."""
        return step_dir / "state"

    @staticmethod
    def rng_file(step_dir: Path, rank: int) -> Path:
        return step_dir / "rank" / f"{rank:05d}.pt"

    @staticmethod
    def data_state_file(step_dir: Path, rank: int) -> Path:
        return step_dir / "data" / f"{rank:05d}.json"

    @staticmethod
    def data_state_files(step_dir: Path) -> list[Path]:
        """Every saved rank's data stream state, by rank."""
        return sorted((step_dir / "data").glob("*.json"))
