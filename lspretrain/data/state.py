"""The checkpointable stream state: a plain dict of ints, bools, lists and None.

It survives ``torch.save`` / ``torch.load(weights_only=True)`` and ``json.dumps``. Schema:

    version, mode, epoch, generation, delivered (flat [start, stop, ...] id ranges),
    seed, shuffle_window, shuffle_shards, drop_last, batch_size   (what the plan depends on)
    world_size, slots_per_rank, num_samples, num_shards, catalog_crc (the layout and data)
    positions: one entry per global slot (rank * slots_per_rank + worker): [p] in epoch mode,
               [draw, offset] in resampled mode, None where this rank does not know it
    next_slot: per rank, the worker slot whose batch comes next (round-robin order)

A rank's own ``state_dict()`` fills only its entries; with torch.distributed initialised the
loader all-gathers so every rank returns the full state. ``merge_states`` does the same for
per-rank dicts collected by other means.
"""
from __future__ import annotations

import zlib

import numpy as np

from .errors import DataError

STATE_VERSION = 1
PLAN_KEYS = ("seed", "shuffle_window", "shuffle_shards", "drop_last", "batch_size", "world_size", "slots_per_rank")


def catalog_crc(counts: tuple[int, ...]) -> int:
    return zlib.crc32(np.asarray(counts, dtype=np.int64).tobytes())


def merge_states(states: list[dict]) -> dict:
    """Combine per-rank states into one full state; they must come from the same step."""
    if not states:
        raise DataError("merge_states: no states given")
    merged = dict(states[0])
    merged["positions"] = list(merged["positions"])
    merged["next_slot"] = list(merged["next_slot"])
    for s in states[1:]:
        for k in merged:
            if k not in ("positions", "next_slot") and s.get(k) != merged[k]:
                raise DataError(f"merge_states: ranks disagree on {k!r} ({merged[k]!r} vs {s.get(k)!r}); "
                                "states must be taken at the same training step")
        for key in ("positions", "next_slot"):
            for i, v in enumerate(s[key]):
                if v is not None:
                    merged[key][i] = v
    return merged


def check_state(state: dict, mode: str, num_samples: int, crc: int) -> None:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise DataError(f"not a version-{STATE_VERSION} data loader state: {str(state)[:200]}")
    if state["mode"] != mode:
        raise DataError(f"state was saved in {state['mode']!r} mode, loader runs in {mode!r} mode")
    if mode == "epoch" and (state["num_samples"] != num_samples or state["catalog_crc"] != crc):
        raise DataError(f"state describes a different dataset ({state['num_samples']} samples in "
                        f"{state['num_shards']} shards, crc {state['catalog_crc']}) than the shards given "
                        f"({num_samples} samples, crc {crc}): sample ids would not match")
