"""Main-process side: the DataLoader over worker slots, and the consumed-position bookkeeping."""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import replace
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .collate import default_collate
from .config import DataConfig
from .errors import BadDataError, DataError
from .plan import Catalog, EpochPlan, EpochPlans, Layout, ResampledPlan, to_ranges
from .reader import EMPTY, POS, SLOT, STATS, SlotDataset
from .shards import ShardInfo, resolve_shards
from .state import STATE_VERSION, catalog_crc, check_state, merge_states
from .stats import DataStats

log = logging.getLogger(__name__)


def _worker_init(_: int) -> None:
    # Workers are processes: one intra-op thread each, or N workers x M threads oversubscribe.
    torch.set_num_threads(1)
    # A Ctrl-C (or a SLURM SIGTERM to the whole job) reaches the workers too; the trainer
    # handles it by finishing the step and saving, which needs the workers alive. They end
    # with the trainer (the DataLoader shuts them down, or they see their parent gone).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def default_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class StatefulLoader:
    """Iterable of batches whose position is exactly what the caller has consumed.

    Epoch mode: each ``iter()`` runs the rest of the current epoch; when it is exhausted the
    epoch counter moves on (``epoch`` property). Resampled mode: each ``iter()`` continues the
    same infinite stream. ``state_dict()`` / ``load_state_dict()`` save and restore the position
    between any two batches; see docs/DATA.md for the resume guarantees.
    """

    def __init__(self, cfg: DataConfig, shards: list[ShardInfo], classes: list[str], transform: Callable | None,
                 collate_fn: Callable | None, rank: int, world_size: int, upfront_bad: list[dict] = ()):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.cfg = cfg
        self.classes = classes
        self.rank, self.world_size = rank, world_size
        self._stats = DataStats()
        for b in upfront_bad:
            self._stats.bad_shard(b["reason"], b["url"])
        empty = [s for s in shards if s.num_samples == 0]
        for s in empty:  # skippable: an empty shard contributes nothing, but is worth a warning
            self._stats.bad_shard("empty_shard", s.url)
        self.shards = [s for s in shards if s.num_samples > 0]
        self.catalog = Catalog(tuple(s.num_samples for s in self.shards))
        self.layout = Layout(world_size, max(1, cfg.num_workers))
        self._transform = transform
        self._collate = collate_fn or default_collate
        self._template = EpochPlan(self.catalog, self.layout, cfg.seed, 0, cfg.shuffle_window, cfg.shuffle_shards,
                                   cfg.drop_last, cfg.batch_size)
        self._resume: EpochPlan | None = None
        self._resampled = ResampledPlan(self.catalog, cfg.seed, cfg.shuffle_window)
        self._epoch = 0
        self._positions = [self._zero() for _ in range(self.layout.slots_per_rank)]
        self._next_slot = 0
        # Read by workers at each iteration start: [epoch, rotation, pos_0a, pos_0b, ...].
        self._control = torch.zeros(2 + 2 * self.layout.slots_per_rank, dtype=torch.int64).share_memory_()
        self._loader: DataLoader | None = None
        self._loader_key: tuple | None = None

    # ----------------------------------------------------------------- iteration
    @property
    def epoch(self) -> int:
        return self._epoch

    def _zero(self) -> list[int]:
        return [0] if self.cfg.mode == "epoch" else [0, 0]

    def _plan(self, epoch: int) -> EpochPlan:
        return EpochPlans(self._template, self._resume)(epoch)

    def _slot_lengths(self) -> list[int]:
        chunks = self._plan(self._epoch).chunks()
        return [len(chunks[self.layout.slot(self.rank, i)]) for i in range(self.layout.slots_per_rank)]

    def _epoch_finished(self) -> bool:
        return all(p[0] >= n for p, n in zip(self._positions, self._slot_lengths()))

    def _start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._positions = [self._zero() for _ in self._positions]
        self._next_slot = 0

    def __len__(self) -> int:
        """Batches per epoch on this rank (epoch mode); nominal passes over the data otherwise."""
        b = self.cfg.batch_size
        if self.cfg.mode == "epoch":
            return sum(-(-n // b) for n in self._slot_lengths())
        return self.catalog.num_samples // (self.world_size * b)

    def _dataloader(self) -> DataLoader:
        key = (self._resume, self._resampled)
        if self._loader is None or key != self._loader_key:
            self.close()
            dataset = SlotDataset(
                self.shards, self.cfg.mode, self.rank, self.layout.slots_per_rank,
                EpochPlans(self._template, self._resume), self._resampled, self.cfg.batch_size,
                self._transform, self._collate, self.cfg.decoder, self.cfg.require_label, self._control)
            nw = self.cfg.num_workers
            self._loader = DataLoader(
                dataset, batch_size=None, num_workers=nw, pin_memory=self.cfg.pin_memory,
                # Persistent workers keep decoders/augmenters warm across epochs; they re-read
                # the control tensor at each iteration, so resuming never needs new processes.
                persistent_workers=nw > 0, prefetch_factor=self.cfg.prefetch_factor if nw else None,
                worker_init_fn=_worker_init if nw else None, in_order=True,
                # Its own generator: a DataLoader iterator draws its workers' base seed from the
                # global torch RNG otherwise, and a resumed run (which creates the iterator after
                # restoring that RNG) would then shift every later draw of the model's own
                # randomness (drop path) by one. Augmentations are seeded per sample, not by it.
                generator=torch.Generator().manual_seed(self.cfg.seed))
            self._loader_key = key
        return self._loader

    def close(self) -> None:
        """Stop the worker processes (also happens when the loader is garbage collected)."""
        if self._loader is not None:
            it = getattr(self._loader, "_iterator", None)
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
            self._loader = None

    def __iter__(self) -> Iterator[dict]:
        if self.cfg.mode == "epoch" and self._epoch_finished():
            self._start_epoch(self._epoch + 1)
        spr = self.layout.slots_per_rank
        control = [self._epoch, self._next_slot]
        for i in range(spr):
            p = self._positions[i]
            control += p + [0] * (2 - len(p))
        self._control.copy_(torch.tensor(control, dtype=torch.int64))
        for batch in self._dataloader():
            local = batch.pop(SLOT)
            self._positions[local] = batch.pop(POS)
            self._next_slot = (local + 1) % spr
            self._stats.add(batch.pop(STATS))
            self._check_bad()
            if batch.pop(EMPTY, False):
                continue
            yield batch
        if self.cfg.mode == "epoch":
            self._start_epoch(self._epoch + 1)

    # ----------------------------------------------------------------- bad data
    def stats(self) -> dict:
        """Counts over everything consumed so far, all workers of this rank together (and, in
        epoch mode, the current epoch)."""
        return {**self._stats.summary(), **({"epoch": self._epoch} if self.cfg.mode == "epoch" else {})}

    def _check_bad(self) -> None:
        s = self._stats
        seen = s.samples + s.bad_samples
        if seen >= self.cfg.bad_check_min_samples and s.bad_samples > self.cfg.max_bad_fraction * seen:
            worst = ", ".join(f"{url} ({n})" for url, n in s.bad_by_shard.most_common(3))
            summary = (f"{s.bad_samples} of {seen} samples were bad ({s.bad_samples / seen:.1%} > data.max_bad_fraction "
                       f"{self.cfg.max_bad_fraction:.1%}); worst shards: {worst}")
            raise BadDataError(
                f"{s.bad_samples} of {seen} samples were bad ({s.bad_samples / seen:.1%} > max_bad_fraction "
                f"{self.cfg.max_bad_fraction:.1%}) in {self.cfg.shards or self.cfg.index!r}; reasons "
                f"{dict(s.bad_sample_reasons)}, bad shards {dict(s.bad_shard_reasons)}; first problems:\n  "
                + "\n  ".join(s.examples), summary)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        spr = self.layout.slots_per_rank
        plan = self._plan(self._epoch) if self.cfg.mode == "epoch" else None
        positions: list = [None] * self.layout.num_slots
        for i, p in enumerate(self._positions):
            positions[self.layout.slot(self.rank, i)] = list(p)
        next_slot: list = [None] * self.world_size
        next_slot[self.rank] = self._next_slot
        state = {
            "version": STATE_VERSION, "mode": self.cfg.mode, "epoch": self._epoch,
            "generation": plan.generation if plan else self._resampled.generation,
            "delivered": list(plan.delivered) if plan else [],
            "seed": self.cfg.seed, "shuffle_window": self.cfg.shuffle_window,
            "shuffle_shards": self.cfg.shuffle_shards, "drop_last": self.cfg.drop_last,
            "batch_size": self.cfg.batch_size, "world_size": self.world_size, "slots_per_rank": spr,
            "num_samples": self.catalog.num_samples, "num_shards": len(self.catalog.counts),
            "catalog_crc": catalog_crc(self.catalog.counts), "positions": positions, "next_slot": next_slot,
        }
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() == self.world_size > 1:
            gathered: list = [None] * self.world_size
            dist.all_gather_object(gathered, state)
            state = merge_states(gathered)
        return state

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Resume from ``state_dict()`` output (full state, or a list of per-rank states).

        Same layout and plan settings: exact continuation. Anything else (world size, workers,
        batch size, seed...): epoch mode continues the epoch with every not-yet-consumed sample
        exactly once; resampled mode starts new independent streams.
        """
        if isinstance(state, list):
            state = merge_states(state)
        check_state(state, self.cfg.mode, self.catalog.num_samples, catalog_crc(self.catalog.counts))
        old_layout = Layout(state["world_size"], state["slots_per_rank"])
        same = all(state[k] == v for k, v in self._plan_settings().items())
        spr = self.layout.slots_per_rank
        own = [self.layout.slot(self.rank, i) for i in range(spr)]
        if self.cfg.mode == "resampled":
            gen = state["generation"] if same else state["generation"] + 1
            self._resampled = replace(self._resampled, generation=gen)
            if same:
                self._positions = [list(state["positions"][s]) for s in own]
                self._next_slot = state["next_slot"][self.rank]
            else:
                log.info("resampled stream: layout/settings changed, starting fresh streams (generation %d)", gen)
                self._positions = [self._zero() for _ in own]
                self._next_slot = 0
            self._check_known()
            return
        old = EpochPlan(self.catalog, old_layout, state["seed"], state["epoch"], state["shuffle_window"],
                        state["shuffle_shards"], state["drop_last"], state["batch_size"], state["generation"],
                        tuple(state["delivered"]))
        self._epoch = state["epoch"]
        if same:
            self._resume = replace(old, layout=self.layout)
            self._positions = [list(state["positions"][s]) for s in own]
            self._next_slot = state["next_slot"][self.rank]
            self._check_known()
            return
        missing = [i for i, p in enumerate(state["positions"]) if p is None]
        if missing:
            raise DataError(f"elastic resume needs every old slot's position; slots {missing} are unknown. Pass the "
                            "state of every rank (merge_states) or save it with torch.distributed initialised")
        delivered = old.delivered_ids([p[0] for p in state["positions"]])
        self._resume = replace(self._template, epoch=state["epoch"], generation=state["generation"] + 1,
                               delivered=to_ranges(delivered))
        self._positions = [self._zero() for _ in own]
        self._next_slot = 0
        log.info("elastic resume of epoch %d: %d of %d samples already delivered, the rest spread over %d slots",
                 self._epoch, len(delivered), self.catalog.num_samples, self.layout.num_slots)

    def _plan_settings(self) -> dict:
        c = self.cfg
        return {"seed": c.seed, "shuffle_window": c.shuffle_window, "shuffle_shards": c.shuffle_shards,
                "drop_last": c.drop_last, "batch_size": c.batch_size, "world_size": self.world_size,
                "slots_per_rank": self.layout.slots_per_rank}

    def _check_known(self) -> None:
        if any(p is None for p in self._positions) or self._next_slot is None:
            raise DataError(f"the state does not hold rank {self.rank}'s positions: pass the full state "
                            "(merge_states of every rank's state_dict())")


def build_loader(cfg: DataConfig, transform: Callable | None = None, collate_fn: Callable | None = None,
                 rank: int | None = None, world_size: int | None = None) -> StatefulLoader:
    """Resolve the shards (fails early when there is nothing to train on) and build the loader.

    ``rank``/``world_size`` default to torch.distributed, then the RANK/WORLD_SIZE variables.
    """
    if rank is None or world_size is None:
        r, w = default_rank_world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    shards, classes, bad = resolve_shards(cfg.shards, cfg.index)
    return StatefulLoader(cfg, shards, classes, transform, collate_fn, rank, world_size, bad)
