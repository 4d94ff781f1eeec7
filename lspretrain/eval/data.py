"""Labelled evaluation images from shards: the first ``max_samples`` of a split, in shard
order, resized to the model's resolution and normalised (no crop margin).

``evaluation_images`` keeps the decoded batches in memory when they fit in ``cache_bytes``
(decoded once, reused by every evaluation) and otherwise returns a re-iterable stream that
decodes them again at each evaluation: ImageNet's 50,000 validation images at 192 px are
22 GB of float32 per rank, which no node should hold eight times over.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator

log = logging.getLogger(__name__)

__all__ = ["LabelledImages", "labelled_batches", "evaluation_images"]


@dataclass(frozen=True)
class LabelledImages:
    """Re-iterable ``{"images", "labels"}`` batches of a split, decoded at each iteration."""

    shards: str
    index: str | None
    img_size: int
    max_samples: int
    batch_size: int = 256

    def __iter__(self) -> Iterator[dict]:
        from ..data import DataConfig, EvalTransform, build_loader

        cfg = DataConfig(shards=self.shards, index=self.index, mode="epoch", batch_size=self.batch_size,
                         num_workers=0, shuffle_window=1, shuffle_shards=False)
        seen, start, last_report = 0, time.perf_counter(), 0.0
        for batch in build_loader(cfg, EvalTransform(size=self.img_size, crop_pct=1.0), rank=0, world_size=1):
            take = min(len(batch["labels"]), self.max_samples - seen)
            yield {"images": batch["images"][:take], "labels": batch["labels"][:take]}
            seen += take
            elapsed = time.perf_counter() - start
            if elapsed - last_report > 10:  # a line every 10 s: this can take minutes
                rate = seen / elapsed
                log.info("evaluation images %d/%d (%.0f/s, ETA %.0f s)", seen, self.max_samples, rate,
                         (self.max_samples - seen) / rate)
                last_report = elapsed
            if seen >= self.max_samples:
                return

    @property
    def decoded_bytes(self) -> int:
        return self.max_samples * 3 * self.img_size**2 * 4  # float32


def labelled_batches(shards: str, index: str | None, img_size: int, max_samples: int, batch_size: int = 256) -> list[dict]:
    """The batches of ``LabelledImages``, decoded now and held in memory."""
    return list(LabelledImages(shards, index, img_size, max_samples, batch_size))


def evaluation_images(shards: str, index: str | None, img_size: int, max_samples: int, batch_size: int,
                      cache_bytes: float) -> list[dict] | LabelledImages:
    """Held in memory when the decoded images fit in ``cache_bytes``, streamed otherwise."""
    images = LabelledImages(shards, index, img_size, max_samples, batch_size)
    if images.decoded_bytes <= cache_bytes:
        return list(images)
    log.info("evaluation images of %s: %.1f GiB decoded > eval.cache_gib, decoded again at each evaluation",
             index or shards, images.decoded_bytes / 2**30)
    return images
