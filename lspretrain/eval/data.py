"""Labelled evaluation images from shards: a fixed, deterministic list of batches."""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def labelled_batches(shards: str, index: str | None, img_size: int, max_samples: int, batch_size: int = 256) -> list[dict]:
    """The first ``max_samples`` samples of a split in shard order, resized to ``img_size`` and
    normalised (no crop margin), as ``{"images", "labels"}`` batches held in memory."""
    from ..data import DataConfig, EvalTransform, build_loader

    cfg = DataConfig(shards=shards, index=index, mode="epoch", batch_size=batch_size, num_workers=0,
                     shuffle_window=1, shuffle_shards=False)
    batches, seen, start, last_report = [], 0, time.perf_counter(), 0.0
    for batch in build_loader(cfg, EvalTransform(size=img_size, crop_pct=1.0), rank=0, world_size=1):
        batches.append({"images": batch["images"], "labels": batch["labels"]})
        seen += len(batch["labels"])
        elapsed = time.perf_counter() - start
        if elapsed - last_report > 10:  # a line every 10 s: this can take a minute on a small machine
            rate = seen / elapsed
            log.info("evaluation images %d/%d (%.0f/s, ETA %.0f s)", seen, max_samples, rate, (max_samples - seen) / rate)
            last_report = elapsed
        if seen >= max_samples:
            break
    return batches
