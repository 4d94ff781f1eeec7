"""Reader: rank/worker splitting, exact and elastic resume, resampled streams, URL specs."""
from __future__ import annotations

import io
import json
import os
from collections import Counter
from itertools import islice

import pytest
import torch

from data_fixtures import keys_of, loader, make_shards
from lspretrain.data import DataError, merge_states

N = 61  # shards of 7: the last shard is short, slots get uneven sample counts


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return make_shards(str(tmp_path_factory.mktemp("shards")), n=N, per_shard=7)


def _roundtrip(state):
    """What a checkpoint does to the state: JSON and torch.save / load(weights_only=True)."""
    state = json.loads(json.dumps(state))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_two_ranks_two_workers_cover_each_sample_once_per_epoch(spec):
    loaders = [loader(spec, rank=r, world_size=2) for r in range(2)]
    epochs = []
    for _ in range(2):
        keys = []
        for ld in loaders:
            batches = list(ld)
            assert len(batches) == len(ld)
            keys += keys_of(batches)
        assert Counter(keys) == Counter(f"{i:09d}" for i in range(N))
        epochs.append(keys)
    assert [ld.epoch for ld in loaders] == [2, 2]
    assert epochs[0] != epochs[1]  # reshuffled each epoch


# Batch 3: rank 0's slots hold 16 and 15 samples -> 6 + 5 batches. Stop after 3 (the other
# worker's turn is next) or after 9 (both then finish: 5th batch of slot 1, then 6th of slot 0).
@pytest.mark.parametrize("stop", [3, 9])
def test_same_world_size_resume_reproduces_sequence(spec, stop):
    for rank in range(2):
        ref = loader(spec, rank=rank, world_size=2, batch_size=3)
        expected = keys_of(ref) + keys_of(islice(iter(ref), 5))  # epoch 0 and the start of epoch 1
        assert len(ref) == (11 if rank == 0 else 10)
        first = loader(spec, rank=rank, world_size=2, batch_size=3)
        it = iter(first)
        got = keys_of(islice(it, stop))  # workers have prefetched beyond this point
        state = _roundtrip(first.state_dict())
        first.close()
        resumed = loader(spec, rank=rank, world_size=2, batch_size=3)
        resumed.load_state_dict(state)
        got += keys_of(resumed)
        assert resumed.epoch == 1
        got += keys_of(islice(iter(resumed), 5))
        assert got == expected


def test_resume_in_main_process_and_after_break(spec):
    ref = keys_of(loader(spec, num_workers=0))
    ld = loader(spec, num_workers=0)
    got = keys_of(islice(iter(ld), 4))
    got += keys_of(islice(iter(ld), 3))  # a new iter() continues where the caller stopped
    st = ld.state_dict()
    ld2 = loader(spec, num_workers=0)
    ld2.load_state_dict(st)
    assert got + keys_of(ld2) == ref


def _consume(loaders, steps):
    keys = []
    for ld in loaders:
        keys += keys_of(islice(iter(ld), steps))
    return keys


@pytest.mark.parametrize("new_world,new_workers", [(3, 2), (1, 2), (3, 1)])
def test_elastic_resume_repeats_and_skips_nothing(spec, new_world, new_workers):
    old = [loader(spec, rank=r, world_size=2) for r in range(2)]
    before = _consume(old, 3)
    state = _roundtrip(merge_states([ld.state_dict() for ld in old]))
    for ld in old:
        ld.close()
    new = [loader(spec, rank=r, world_size=new_world, num_workers=new_workers) for r in range(new_world)]
    for ld in new:
        ld.load_state_dict(state)
    after = _consume(new, 10 ** 6)
    assert Counter(before + after) == Counter(f"{i:09d}" for i in range(N))
    assert all(ld.epoch == 1 for ld in new)
    # The next epoch is a normal full epoch on the new layout.
    nxt = _consume(new, 10 ** 6)
    assert sorted(nxt) == [f"{i:09d}" for i in range(N)]


def test_chained_elastic_resumes(spec):
    """2 ranks -> 3 ranks -> 1 rank within one epoch: still every sample exactly once."""
    a = [loader(spec, rank=r, world_size=2) for r in range(2)]
    seen = _consume(a, 2)
    state = merge_states([ld.state_dict() for ld in a])
    b = [loader(spec, rank=r, world_size=3, num_workers=1) for r in range(3)]
    for ld in b:
        ld.load_state_dict(state)
    seen += _consume(b, 2)
    state = _roundtrip(merge_states([ld.state_dict() for ld in b]))
    assert state["generation"] == 1 and state["delivered"]
    c = loader(spec, rank=0, world_size=1, num_workers=2)
    c.load_state_dict(state)
    seen += keys_of(c)
    assert Counter(seen) == Counter(f"{i:09d}" for i in range(N))


def test_elastic_resume_needs_every_rank(spec):
    a = loader(spec, rank=0, world_size=2)
    next(iter(a))
    b = loader(spec, rank=0, world_size=1)
    with pytest.raises(DataError, match="every old slot"):
        b.load_state_dict(a.state_dict())


def test_drop_last_gives_equal_full_batches_per_rank(spec):
    loaders = [loader(spec, rank=r, world_size=2, drop_last=True) for r in range(2)]
    per_rank = [list(ld) for ld in loaders]
    assert len(per_rank[0]) == len(per_rank[1]) == len(loaders[0])
    assert all(len(b["keys"]) == 4 for batches in per_rank for b in batches)
    keys = keys_of(per_rank[0] + per_rank[1])
    assert len(keys) == len(set(keys)) == 4 * 4 * (N // 4 // 4)


def test_resampled_stream_is_infinite_and_resumes_exactly(spec):
    ref = loader(spec, mode="resampled", rank=1, world_size=2)
    expected = keys_of(islice(iter(ref), 30))  # 120 samples > 61: it wraps
    assert len(expected) == 120 and len(set(expected)) < 120
    ld = loader(spec, mode="resampled", rank=1, world_size=2)
    got = keys_of(islice(iter(ld), 11))
    state = _roundtrip(ld.state_dict())
    ld2 = loader(spec, mode="resampled", rank=1, world_size=2)
    ld2.load_state_dict(state)
    assert got + keys_of(islice(iter(ld2), 19)) == expected
    # Another world size: fresh, independent streams (nothing to complete in resampled mode).
    ld3 = loader(spec, mode="resampled", rank=0, world_size=3)
    ld3.load_state_dict(state)
    assert len(keys_of(islice(iter(ld3), 3))) == 12 and ld3.state_dict()["generation"] == 1


def test_pipe_urls_and_index_by_name(spec):
    folder = os.path.dirname(spec)
    pipe_spec = f"pipe:cat {folder}/s-{{000000..000008}}.tar"
    ld = loader(pipe_spec, rank=0, world_size=1, index=os.path.join(folder, "s-index.json"))
    assert len(ld) == -(-31 // 4) + -(-30 // 4)  # counts come from the index, split over 2 workers
    assert sorted(keys_of(ld)) == [f"{i:09d}" for i in range(N)]


def test_rank_defaults_from_environment(spec, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    from lspretrain.data import DataConfig, build_loader
    ld = build_loader(DataConfig(shards=spec, num_workers=0))
    assert (ld.rank, ld.world_size) == (1, 3)


@pytest.mark.parametrize("workers", [0, 1])
def test_starting_the_stream_leaves_the_global_rng_alone(spec, workers):
    """The model's own randomness (drop path) draws from the global torch RNG, and a resumed
    run starts its stream after restoring that RNG: starting a stream must not draw from it."""
    ld = loader(spec, num_workers=workers)
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    next(iter(ld))
    assert torch.equal(torch.rand(4), want)
    ld.close()
