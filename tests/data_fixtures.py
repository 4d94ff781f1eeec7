"""Shared helpers for the data tests: tiny real shards written by the shard writer."""
from __future__ import annotations

import os

import numpy as np

from lspretrain.data import DataConfig, build_loader
from lspretrain.data.shard_writer import EncodeOptions, Item, write_shards


def pixels(i: int, size: int = 8) -> np.ndarray:
    """A deterministic image per sample id, so a round trip can be checked exactly."""
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def make_shards(folder: str, n: int, per_shard: int, prefix: str = "s", size: int = 8, encode: str = "png") -> str:
    """``n`` samples (label = id % 10) in shards of ``per_shard``; returns the brace spec."""
    items = [Item(f"img{i}", i % 10, pixels(i, size)) for i in range(n)]
    index = write_shards(items, folder, prefix, [str(c) for c in range(10)], max_count=per_shard,
                         options=EncodeOptions(encode=encode), num_workers=1)
    last = len(index.shards) - 1
    return os.path.join(folder, f"{prefix}-{{000000..{last:06d}}}.tar")


def key_collate(samples: list[dict]) -> dict:
    """Batches that name their samples: what the order/coverage tests compare."""
    return {"keys": [s["key"] for s in samples], "labels": [s["label"] for s in samples]}


def loader(spec: str, rank: int = 0, world_size: int = 1, **kw):
    cfg = DataConfig(shards=spec, **{"batch_size": 4, "num_workers": 2, "shuffle_window": 8, **kw})
    return build_loader(cfg, None, key_collate, rank=rank, world_size=world_size)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]
