"""DataConfig: every knob of the streaming pipeline in one typed place."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    """Settings for :func:`lspretrain.data.build_loader`.

    shards: URL spec: brace ranges (``train-{000000..000127}.tar``), ``::``-separated lists,
        local globs, or ``pipe:CMD`` URLs (e.g. ``pipe:aws s3 cp s3://b/x-{0..9}.tar -``).
        May be empty when ``index`` is given: then every shard of the index is used.
    index: JSON index written by ``tools/make_shards.py``. ``None``: look for one next to local
        shards; without any index the shards are scanned once to count samples (slow, logged).
    mode: ``"resampled"`` (infinite stream, shards drawn with replacement; SSL) or ``"epoch"``
        (every sample exactly once per epoch across all ranks and workers; supervised).
    batch_size: per rank.
    shuffle_window: samples are permuted within consecutive windows of this many samples of a
        worker's stream (memory: window x encoded sample size per worker). 1 disables.
    shuffle_shards: permute the shard order each epoch.
    drop_last: epoch mode only. Give every (rank, worker) slot the same whole number of
        batches, so all ranks run the same number of steps; the few samples left over differ
        from epoch to epoch. ``False``: every sample once, partial batches at slot ends.
    max_bad_fraction: abort when bad samples / samples read exceeds this, once at least
        ``bad_check_min_samples`` samples were read.
    decoder: ``"auto"`` (simplejpeg for JPEG, PIL otherwise), ``"simplejpeg"`` or ``"pil"``.
    require_label: samples without a ``cls`` entry are bad; ``False`` gives them label -1 (SSL).
    """

    shards: str = ""
    index: str | None = None
    mode: Literal["resampled", "epoch"] = "epoch"
    batch_size: int = 32
    num_workers: int = 2
    seed: int = 0
    shuffle_window: int = 512
    shuffle_shards: bool = True
    drop_last: bool = False
    max_bad_fraction: float = 0.01
    bad_check_min_samples: int = 1000
    decoder: Literal["auto", "simplejpeg", "pil"] = "auto"
    require_label: bool = True
    prefetch_factor: int = 2
    pin_memory: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("resampled", "epoch"):
            raise ValueError(f"DataConfig.mode must be 'resampled' or 'epoch', got {self.mode!r}")
        if self.decoder not in ("auto", "simplejpeg", "pil"):
            raise ValueError(f"DataConfig.decoder must be auto/simplejpeg/pil, got {self.decoder!r}")
        for name in ("batch_size", "shuffle_window", "prefetch_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"DataConfig.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if not self.shards and not self.index:
            raise ValueError("DataConfig needs `shards` (a URL spec) or `index` (an index JSON)")
