"""Which sample each (rank, worker) slot delivers, in which order: pure functions of the config.

Nothing here holds state. An epoch's plan is computed from (seed, epoch, generation, layout,
shard counts, samples already delivered), identically in the main process and in every worker,
so the stream position of a slot is a single integer and resuming needs no replay.

Samples have global ids: shard ``i`` holds ids ``offsets[i] .. offsets[i] + count[i] - 1``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

_EPOCH, _RESAMPLED = 1, 2  # domain tags so the two modes never share random streams


def rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


@dataclass(frozen=True)
class Catalog:
    """Shard sample counts -> global sample ids."""

    counts: tuple[int, ...]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])

    @property
    def num_samples(self) -> int:
        return int(sum(self.counts))

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global ids -> (shard, index within shard)."""
        offsets = self.offsets
        shard = np.searchsorted(offsets, ids, side="right") - 1
        return shard, ids - offsets[shard]


@dataclass(frozen=True)
class Layout:
    world_size: int
    slots_per_rank: int  # DataLoader workers per rank, 1 when reading in the main process

    @property
    def num_slots(self) -> int:
        return self.world_size * self.slots_per_rank

    def slot(self, rank: int, local: int) -> int:
        return rank * self.slots_per_rank + local


@dataclass(frozen=True)
class EpochPlan:
    """One epoch, or the rest of one after an elastic resume (generation > 0)."""

    catalog: Catalog
    layout: Layout
    seed: int
    epoch: int
    shuffle_window: int
    shuffle_shards: bool
    drop_last: bool
    batch_size: int
    generation: int = 0
    delivered: tuple[int, ...] = field(default=())  # flat [start, stop, ...] id ranges of earlier generations

    def read_order(self) -> np.ndarray:
        """All ids still due this epoch, shard after shard in the epoch's shard order."""
        counts = self.catalog.counts
        order = (rng(self.seed, _EPOCH, self.epoch).permutation(len(counts)) if self.shuffle_shards
                 else np.arange(len(counts)))
        offsets = self.catalog.offsets
        ids = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in order] or [np.zeros(0, np.int64)])
        if self.delivered:
            keep = np.ones(self.catalog.num_samples, dtype=bool)
            for a, b in zip(self.delivered[::2], self.delivered[1::2]):
                keep[a:b] = False
            ids = ids[keep[ids]]
        return ids.astype(np.int64)

    def chunks(self) -> list[np.ndarray]:
        """Contiguous runs of the read order, one per slot, sizes within one of each other.

        Contiguous runs keep reads sequential: a slot opens each shard at most once per pass
        and only the shards at run boundaries are read (partly) by two slots.
        """
        ids = self.read_order()
        n = self.layout.num_slots
        if self.drop_last:
            per = len(ids) // n // self.batch_size * self.batch_size
            return [ids[i * per:(i + 1) * per] for i in range(n)]
        return np.array_split(ids, n)

    def window_perm(self, slot: int, window: int, length: int) -> np.ndarray:
        if self.shuffle_window <= 1:
            return np.arange(length)
        return rng(self.seed, _EPOCH, self.epoch, self.generation, slot, window).permutation(length)

    def delivery_order(self, slot: int, chunk: np.ndarray) -> np.ndarray:
        """The order a slot hands its chunk out: each window of ``shuffle_window`` permuted."""
        k = self.shuffle_window
        out = chunk.copy()
        for w, lo in enumerate(range(0, len(chunk), k)):
            part = chunk[lo:lo + k]
            out[lo:lo + len(part)] = part[self.window_perm(slot, w, len(part))]
        return out

    def delivered_ids(self, positions: list[int]) -> np.ndarray:
        """Ids delivered when every slot stopped at ``positions`` (earlier generations included)."""
        parts = [self.delivery_order(s, c)[:p] for s, (c, p) in enumerate(zip(self.chunks(), positions))]
        parts += [np.arange(a, b) for a, b in zip(self.delivered[::2], self.delivered[1::2])]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def to_ranges(ids: np.ndarray) -> tuple[int, ...]:
    """Sorted unique ids -> flat (start, stop, ...) ranges: compact, JSON- and torch.save-able."""
    ids = np.unique(ids)
    if len(ids) == 0:
        return ()
    breaks = np.nonzero(np.diff(ids) != 1)[0]
    starts = np.concatenate([[ids[0]], ids[breaks + 1]])
    stops = np.concatenate([ids[breaks] + 1, [ids[-1] + 1]])
    return tuple(int(x) for pair in zip(starts, stops) for x in pair)


@dataclass(frozen=True)
class ResampledPlan:
    """Infinite stream per slot: draw j picks a shard uniformly, reads it whole, window-shuffled.

    A position is (draw, offset): draws are independent, so skipping to draw j costs nothing.
    """

    catalog: Catalog
    seed: int
    shuffle_window: int
    generation: int = 0

    def shard_of_draw(self, slot: int, draw: int) -> int:
        return int(rng(self.seed, _RESAMPLED, self.generation, slot, draw).integers(len(self.catalog.counts)))

    def window_perm(self, slot: int, draw: int, window: int, length: int) -> np.ndarray:
        if self.shuffle_window <= 1:
            return np.arange(length)
        return rng(self.seed, _RESAMPLED, self.generation, slot, draw, window).permutation(length)


@dataclass(frozen=True)
class EpochPlans:
    """Plan for any epoch: fresh ones from ``template``; ``resume`` for the epoch being resumed."""

    template: EpochPlan
    resume: EpochPlan | None = None

    def __call__(self, epoch: int) -> EpochPlan:
        if self.resume is not None and self.resume.epoch == epoch:
            return self.resume
        return replace(self.template, epoch=epoch)
