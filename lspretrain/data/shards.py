"""Shard lists: URL spec expansion, the JSON index, and counting samples per shard."""
from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field

from webdataset.shardlists import expand_urls

from .errors import DataError

log = logging.getLogger(__name__)

INDEX_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    url: str
    num_samples: int


@dataclass
class ShardIndex:
    """What ``<prefix>-index.json`` holds: shard names (relative to the index), counts, classes."""

    shards: list[dict]  # {"name": str, "num_samples": int, "num_bytes": int}
    classes: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"path": str, "reason": str}
    source: str = ""

    @property
    def num_samples(self) -> int:
        return sum(s["num_samples"] for s in self.shards)

    def to_json(self) -> dict:
        return {
            "version": INDEX_VERSION,
            "num_samples": self.num_samples,
            "shards": self.shards,
            "classes": self.classes,
            "skipped": self.skipped,
            "source": self.source,
        }

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(tmp, path)  # the index appears last and atomically: its presence means "complete"

    @classmethod
    def load(cls, path: str) -> "ShardIndex":
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read shard index {path}: {e}") from e
        if raw.get("version") != INDEX_VERSION or "shards" not in raw:
            raise DataError(f"{path} is not a version-{INDEX_VERSION} shard index")
        return cls(raw["shards"], raw.get("classes", []), raw.get("skipped", []), raw.get("source", ""))


def index_path(out_dir: str, prefix: str) -> str:
    return os.path.join(out_dir, f"{prefix}-index.json")


def expand_spec(spec: str) -> list[str]:
    """Brace ranges and ``::`` lists via webdataset; local globs on top. Never empty."""
    urls: list[str] = []
    for url in expand_urls(spec):
        if not url.startswith("pipe:") and "://" not in url and glob.has_magic(url):
            urls.extend(sorted(glob.glob(url)))
        else:
            urls.append(url)
    if not urls:
        raise DataError(f"shard spec {spec!r} matched no shards")
    return urls


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def _find_index_for(urls: list[str]) -> str | None:
    """An index next to local shards that lists the first shard."""
    first = urls[0]
    if not is_local(first):
        return None
    folder, name = os.path.split(first)
    for candidate in sorted(glob.glob(os.path.join(folder or ".", "*index.json"))):
        try:
            idx = ShardIndex.load(candidate)
        except DataError:
            continue
        if any(s["name"] == name for s in idx.shards):
            return candidate
    return None


def count_samples(url: str) -> int:
    """Samples in one shard, by reading tar headers (no decoding). Unreadable shard: 0."""
    from .tario import iter_tar_samples

    n = 0
    try:
        for _ in iter_tar_samples(url):
            n += 1
    except Exception as e:  # a broken shard contributes what could be read; the reader reports it
        log.warning("counting %s stopped after %d samples: %s", url, n, e)
    return n


def resolve_shards(spec: str, index: str | None) -> tuple[list[ShardInfo], list[str], list[dict]]:
    """(readable shards with counts, class names, bad shards found up front).

    Missing local files are dropped here and reported as bad shards, so that sample counts
    only cover shards that exist; all shards missing is fatal.
    """
    urls = expand_spec(spec) if spec else []
    index = index or (_find_index_for(urls) if urls else None)
    counts: dict[str, int] = {}
    classes: list[str] = []
    if index:
        idx = ShardIndex.load(index)
        classes = idx.classes
        folder = os.path.dirname(index)
        by_name = {s["name"]: s["num_samples"] for s in idx.shards}
        if not urls:
            urls = [os.path.join(folder, s["name"]) for s in idx.shards]
        # Shards are matched to index entries by file name, so the same index serves a
        # local copy and a pipe:/object-store URL of the same files.
        for u in urls:
            name = os.path.basename(u.split()[-1] if u.startswith("pipe:") else u)
            if name in by_name:
                counts[u] = by_name[name]
    bad: list[dict] = []
    present = []
    for u in urls:
        if is_local(u) and not os.path.exists(u):
            log.warning("shard %s does not exist: skipped", u)
            bad.append({"url": u, "reason": "missing_shard"})
        else:
            present.append(u)
    if not present:
        raise DataError(f"none of the {len(urls)} shards of {spec or index!r} exists (first: {urls[0]})")
    missing_counts = [u for u in present if u not in counts]
    if missing_counts:
        log.warning("no index entry for %d shards (first %s): counting samples by scanning them; "
                    "write an index with `tools/make_shards.py index` to avoid this", len(missing_counts),
                    missing_counts[0])
        for u in missing_counts:
            counts[u] = count_samples(u)
    shards = [ShardInfo(u, counts[u]) for u in present]
    if sum(s.num_samples for s in shards) == 0:
        raise DataError(f"the shards of {spec or index!r} hold no samples")
    return shards, classes, bad
