"""Worker side: read a slot's samples from tar shards, decode, transform, batch, tag.

Each DataLoader worker serves one slot and yields whole collated batches, each tagged with
the slot's stream position *after* that batch and the bad-data counts since the previous
batch. The main process (``loader.StatefulLoader``) records positions only from batches it
hands to the trainer, so prefetched batches never leak into the checkpointed state.
"""
from __future__ import annotations

import random
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .decode import DecodeError, decode_image, find_image
from .plan import Catalog, EpochPlan, ResampledPlan
from .shards import ShardInfo
from .stats import DataStats

# Keys the worker adds to each batch dict; the main process pops them.
SLOT, POS, STATS, EMPTY = "_slot", "_pos", "_stats", "_empty"
COLLATE_SEED = 1 << 30  # seed-key suffix for collate-time randomness (masks, batched photometrics)


class ShardCursor:
    """Sequential access to samples of one shard at a time, kept open across windows.

    Asking for indices beyond the current read point continues the same tar stream; only a
    request that goes backwards (or to another shard) reopens. A shard that failed is not
    reopened in this pass: everything at or after the failure point is reported missing.
    """

    def __init__(self, shards: list[ShardInfo], stats: DataStats):
        self.shards = shards
        self.stats = stats
        self._shard = -1
        self._gen: Iterator[dict] | None = None
        self._next = 0  # first sample index the open stream has not yielded
        self._wanted: set[int] = set()
        self._failed: dict[int, tuple[int, str]] = {}  # shard -> (first unreadable index, reason)

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
        self._gen, self._shard = None, -1

    def fetch(self, shard: int, indices: np.ndarray) -> list[dict | str]:
        """Raw samples for ascending ``indices`` of ``shard``; a reason string where missing."""
        from .tario import iter_tar_samples

        url = self.shards[shard].url
        failed_at, reason = self._failed.get(shard, (None, ""))
        if failed_at is not None and indices[0] >= failed_at:
            return [reason] * len(indices)
        if shard != self._shard or indices[0] < self._next:
            self.close()
            self._shard, self._next = shard, 0
            self._gen = iter_tar_samples(url, want=lambda i: i in self._wanted)
        self._wanted = set(int(i) for i in indices)
        found: dict[int, dict] = {}
        last = int(indices[-1])
        try:
            while self._next <= last:
                sample = next(self._gen)
                self._next = sample["__index__"] + 1
                found[sample["__index__"]] = sample
        except StopIteration:
            # Fewer samples than the index promised. Python's streaming tarfile treats a tar cut
            # at a header boundary as a normal end, so this is how truncation usually shows up;
            # a member cut mid-payload raises instead (below). The rest is reported missing.
            self._failed[shard] = (self._next, "missing_sample")
            self.stats.bad_shard("truncated_shard", url, f"ends after {self._next} of "
                                 f"{self.shards[shard].num_samples} samples")
            self.close()
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            # Truncated or unreadable tar (or a pipe: command that failed): skip the rest of it.
            reason = "unreadable_shard" if self._next == 0 else "truncated_shard"
            self._failed[shard] = (self._next, "missing_sample")
            self.stats.bad_shard(reason, url, f"after {self._next} samples: {type(e).__name__}: {e}")
            self.close()
        return [found.get(int(i), "missing_sample") for i in indices]


@dataclass
class Window:
    """Samples read together and handed out in a permuted order."""

    ids: list[tuple[int, int]]  # (shard, index) in read order
    perm: np.ndarray
    start: int  # first permuted offset still to deliver
    position: Callable[[int], list[int]]  # slot position after delivering permuted offset o


class SlotDataset(IterableDataset):
    """Yields tagged batches for the slot a worker serves; see module docstring.

    ``control`` is a small shared-memory int64 tensor written by the main process before each
    ``iter(DataLoader)``: [epoch, rotation, pos_0a, pos_0b, pos_1a, ...]. Persistent workers
    re-read it at every iteration start, so they never need to be re-created to resume.
    """

    def __init__(self, shards: list[ShardInfo], mode: str, rank: int, slots_per_rank: int,
                 plan_for_epoch: Callable[[int], EpochPlan] | None, resampled: ResampledPlan | None,
                 batch_size: int, transform: Callable | None, collate_fn: Callable, decoder: str,
                 require_label: bool, control: torch.Tensor):
        self.shards = shards
        self.mode = mode
        self.rank = rank
        self.slots_per_rank = slots_per_rank
        self.plan_for_epoch = plan_for_epoch
        self.resampled = resampled
        self.batch_size = batch_size
        self.transform = transform
        self.collate_fn = collate_fn
        self.decoder = decoder
        self.require_label = require_label
        self.control = control

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        ctrl = self.control.tolist()
        epoch, rotation = ctrl[0], ctrl[1]
        # Rotation makes worker 0 serve the slot whose turn is next, because a (re)started
        # DataLoader always asks worker 0 first: this keeps the round-robin order on resume.
        local = (worker + rotation) % self.slots_per_rank
        slot = self.rank * self.slots_per_rank + local
        pos = ctrl[2 + 2 * local: 4 + 2 * local]
        stats = DataStats()
        cursor = ShardCursor(self.shards, stats)
        if self.mode == "epoch":
            plan = self.plan_for_epoch(epoch)
            windows = self._epoch_windows(plan, slot, pos[0])
            seed_key, pos = [plan.seed, 1, epoch, plan.generation, slot], pos[:1]
        else:
            windows = self._resampled_windows(slot, pos[0], pos[1])
            seed_key = [self.resampled.seed, 2, self.resampled.generation, slot]
        batches = self._batches(windows, cursor, stats, local, pos, seed_key)
        try:
            # In a worker process the reseeding below touches only that worker's RNGs; in the
            # training process itself (num_workers=0) the trainer's RNGs are kept out of it.
            yield from batches if info is not None else _caller_rng_kept(batches)
        finally:
            cursor.close()

    def _epoch_windows(self, plan: EpochPlan, slot: int, pos: int) -> Iterator[Window]:
        chunk = plan.chunks()[slot]
        shard, index = plan.catalog.locate(chunk)
        k = plan.shuffle_window
        for w in range(pos // k, -(-len(chunk) // k)):
            lo, hi = w * k, min(w * k + k, len(chunk))
            yield Window(list(zip(shard[lo:hi].tolist(), index[lo:hi].tolist())),
                         plan.window_perm(slot, w, hi - lo), max(pos - lo, 0), lambda o, lo=lo: [lo + o + 1])

    def _resampled_windows(self, slot: int, draw: int, offset: int) -> Iterator[Window]:
        plan = self.resampled
        k = plan.shuffle_window
        while True:
            shard = plan.shard_of_draw(slot, draw)
            count = plan.catalog.counts[shard]
            for w in range(offset // k, -(-count // k)):
                lo, hi = w * k, min(w * k + k, count)
                yield Window([(shard, i) for i in range(lo, hi)], plan.window_perm(slot, draw, w, hi - lo),
                             max(offset - lo, 0), lambda o, lo=lo, d=draw: [d, lo + o + 1])
            draw, offset = draw + 1, 0

    def _read(self, window: Window, cursor: ShardCursor) -> list[dict | str]:
        out: list[dict | str] = []
        ids = window.ids
        i = 0
        while i < len(ids):  # one fetch per run of the same shard
            j = i
            while j < len(ids) and ids[j][0] == ids[i][0]:
                j += 1
            out += cursor.fetch(ids[i][0], np.array([x[1] for x in ids[i:j]]))
            i = j
        return out

    def _batches(self, windows: Iterator[Window], cursor: ShardCursor, stats: DataStats, local: int,
                 start: list[int], seed_key: list[int]) -> Iterator[dict]:
        batch: list[dict] = []
        pos, emitted = list(start), list(start)
        for window in windows:
            raws = self._read(window, cursor)
            for o in range(window.start, len(window.perm)):
                shard, index = window.ids[window.perm[o]]
                _reseed(seed_key + pos)
                sample = self._prepare(raws[window.perm[o]], self.shards[shard].url, index, stats)
                pos = window.position(o)
                if sample is not None:
                    batch.append(sample)
                if len(batch) == self.batch_size:
                    _reseed(seed_key + pos + [COLLATE_SEED])
                    yield self._tag(self.collate_fn(batch), local, pos, stats)
                    batch, emitted = [], pos
        if batch:
            _reseed(seed_key + pos + [COLLATE_SEED])
            yield self._tag(self.collate_fn(batch), local, pos, stats)
        elif pos != emitted or not stats.empty():
            # Bad samples after the last batch still move the position and must be counted.
            yield self._tag({EMPTY: True}, local, pos, stats)

    @staticmethod
    def _tag(batch: Any, local: int, pos: list[int], stats: DataStats) -> dict:
        if not isinstance(batch, dict):
            raise TypeError(f"collate_fn must return a dict of tensors, got {type(batch).__name__}")
        batch[SLOT], batch[POS], batch[STATS] = local, list(pos), stats.take()
        return batch

    def _prepare(self, raw: dict | str, url: str, index: int, stats: DataStats) -> dict | None:
        """Decode + transform one raw sample, or count why it is unusable."""
        if isinstance(raw, str):  # never read: its key is unknown, name it by position
            stats.bad_sample(raw, url, f"#{index}")
            return None
        key = raw["__key__"]
        data = find_image(raw)
        if data is None:
            stats.bad_sample("no_image", url, key, f"(entries: {sorted(k for k in raw if not k.startswith('__'))})")
            return None
        label = -1
        if "cls" in raw:
            try:
                label = int(raw["cls"].decode().strip())
            except (UnicodeDecodeError, ValueError):
                stats.bad_sample("bad_label", url, key, f"cls={raw['cls'][:20]!r}")
                return None
        elif self.require_label:
            stats.bad_sample("no_label", url, key)
            return None
        try:
            image = decode_image(data, self.decoder)
        except DecodeError as e:
            stats.bad_sample("corrupt_image", url, key, str(e))
            return None
        stats.samples += 1
        return {"image": self.transform(image) if self.transform else image, "label": label, "key": key}


def _caller_rng_kept(batches: Iterator[dict]) -> Iterator[dict]:
    """``batches``, with the caller's python / numpy / torch CPU RNG states restored after each
    batch is made: the model's own randomness (drop path) then never depends on the data."""
    while True:
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            batch = next(batches)
        except StopIteration:
            return
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
        yield batch


def _reseed(key: list[int]) -> None:
    """Seed every RNG a transform may use from the sample's place in the stream.

    Augmentations then depend only on (seed, epoch, slot, position), not on which process or
    how many restarts produced them: a resumed run sees the very same crops and masks.
    """
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    torch.default_generator.manual_seed(int(state[0]) << 32 | int(state[1]))  # CPU only: never a CUDA RNG
