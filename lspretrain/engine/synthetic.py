"""A deterministic in-memory classification stream with the StatefulLoader protocol.

Sample ``i`` of the global stream is a pure function of (seed, i): a class prototype plus
noise. Step ``s`` of rank ``r`` gets global samples ``[s*G + r*B, s*G + (r+1)*B)`` (B per-rank
batch, G = B * world size), so runs with the same global batch see the same samples whatever
the world size, and the state (samples consumed so far) continues on any world size.
"""
from __future__ import annotations

from typing import Iterator

import torch

__all__ = ["SyntheticLoader"]


class SyntheticLoader:
    def __init__(self, batch_size: int, img_size: int, num_classes: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.batch_size, self.img_size, self.num_classes = batch_size, img_size, num_classes
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.consumed = 0  # global samples handed out (all ranks), the whole stream state
        g = torch.Generator().manual_seed(seed)
        self.prototypes = torch.randn(num_classes, 3, img_size, img_size, generator=g)

    @property
    def epoch(self) -> int:
        return 0

    def sample(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = int(torch.randint(self.num_classes, (), generator=g))
        noise = 0.5 * torch.randn(3, self.img_size, self.img_size, generator=g)
        return self.prototypes[label] + noise, label

    def __iter__(self) -> Iterator[dict]:
        while True:
            start = self.consumed + self.rank * self.batch_size
            images, labels = zip(*(self.sample(start + j) for j in range(self.batch_size)))
            self.consumed += self.batch_size * self.world_size
            yield {"images": torch.stack(images), "labels": torch.tensor(labels)}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "world_size": self.world_size, "rank": self.rank}

    def load_state_dict(self, state: dict | list[dict]) -> None:
        states = state if isinstance(state, list) else [state]
        counts = {s["consumed"] for s in states}
        if len(counts) != 1:
            raise ValueError(f"synthetic loader states disagree on samples consumed: {sorted(counts)}")
        self.consumed = counts.pop()

    def stats(self) -> dict:
        return {"bad_samples": 0, "samples": self.consumed}
