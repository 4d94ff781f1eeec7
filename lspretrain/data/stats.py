"""Bad-data accounting: counted in workers, shipped with each batch, summed in the main process."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger("lspretrain.data")

MAX_EXAMPLES = 20


@dataclass
class DataStats:
    samples: int = 0  # good samples handed to the transform
    bad_sample_reasons: Counter = field(default_factory=Counter)
    bad_shard_reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # "reason: shard key detail", first few
    bad_by_shard: Counter = field(default_factory=Counter)  # shard URL -> bad samples + bad-shard events

    @property
    def bad_samples(self) -> int:
        return sum(self.bad_sample_reasons.values())

    @property
    def bad_shards(self) -> int:
        return sum(self.bad_shard_reasons.values())

    def bad_sample(self, reason: str, shard: str, key: str, detail: str = "") -> None:
        self.bad_sample_reasons[reason] += 1
        self.bad_by_shard[shard] += 1
        self._note(f"bad sample ({reason}): shard {shard} key {key} {detail}".rstrip())

    def bad_shard(self, reason: str, shard: str, detail: str = "") -> None:
        self.bad_shard_reasons[reason] += 1
        self.bad_by_shard[shard] += 1
        self._note(f"bad shard ({reason}): {shard} {detail}".rstrip())

    def _note(self, msg: str) -> None:
        log.warning(msg)
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(msg)

    def empty(self) -> bool:
        return not (self.samples or self.bad_sample_reasons or self.bad_shard_reasons)

    def take(self) -> dict:
        """Plain-dict delta since the last take (what a worker attaches to a batch), then reset."""
        out = {"samples": self.samples, "bad_samples": dict(self.bad_sample_reasons),
               "bad_shards": dict(self.bad_shard_reasons), "examples": list(self.examples),
               "bad_by_shard": dict(self.bad_by_shard)}
        self.samples = 0
        self.bad_sample_reasons.clear()
        self.bad_shard_reasons.clear()
        self.bad_by_shard.clear()
        self.examples.clear()
        return out

    def add(self, delta: dict) -> None:
        self.samples += delta["samples"]
        self.bad_sample_reasons.update(delta["bad_samples"])
        self.bad_shard_reasons.update(delta["bad_shards"])
        self.bad_by_shard.update(delta["bad_by_shard"])
        self.examples.extend(delta["examples"][: max(0, MAX_EXAMPLES - len(self.examples))])

    def summary(self) -> dict:
        seen = self.samples + self.bad_samples
        return {
            "samples": self.samples,
            "bad_samples": self.bad_samples,
            "bad_shards": self.bad_shards,
            "bad_fraction": self.bad_samples / seen if seen else 0.0,
            **{f"bad_sample/{k}": v for k, v in sorted(self.bad_sample_reasons.items())},
            **{f"bad_shard/{k}": v for k, v in sorted(self.bad_shard_reasons.items())},
        }
