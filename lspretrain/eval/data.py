"""Labelled evaluation images from shards: the first ``max_samples`` of a split, in shard
order, resized to the model's resolution and normalised (no crop margin).

``evaluation_images`` keeps the decoded batches in memory when they fit in ``cache_bytes``
(decoded once, reused by every evaluation) and otherwise returns a re-iterable stream that
decodes them again at each evaluation: ImageNet's 50,000 validation images at 192 px are
22 GB of float32 per rank, which no node should hold eight times over.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

from ..progress import Progress

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
        progress = Progress("evaluation images", self.max_samples, logger=log)  # this can take minutes
        for batch in build_loader(cfg, EvalTransform(size=self.img_size, crop_pct=1.0), rank=0, world_size=1):
            take = min(len(batch["labels"]), self.max_samples - progress.done)
            yield {"images": batch["images"][:take], "labels": batch["labels"][:take]}
            progress.update(take)
            if progress.done >= self.max_samples:
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
