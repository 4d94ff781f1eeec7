"""Streaming tar reading with webdataset's sample conventions.

A sample is the run of consecutive tar members sharing a key: the member path up to the first
dot of its file name (``dir/000123.jpg`` -> key ``dir/000123``, ext ``jpg``). Keys therefore must
not contain dots; the writer uses zero-padded counters.
"""
from __future__ import annotations

import tarfile
from typing import Iterator

from webdataset.gopen import gopen


def _split_key(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext.lower() if dot else ""


def iter_tar_samples(url: str, want=None) -> Iterator[dict]:
    """Yield ``{"__key__", "__index__", ext: bytes...}`` for each sample, in tar order.

    ``want(index) -> bool`` selects samples; unwanted samples are skipped without reading
    their payload into Python objects. Tar errors propagate (the caller decides what a
    truncated shard means); the partially read sample at an error is never yielded.
    """
    stream = gopen(url, "rb")
    try:
        # "r|*": forward-only streaming, works for pipes and object stores.
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            current: dict | None = None
            index = -1
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                # Members starting with "__" (e.g. wds "__key__" metadata) are not payloads.
                if key.startswith("__") or not ext:
                    continue
                if current is None or current["__key__"] != key:
                    if current is not None and (want is None or want(index)):
                        yield current
                    index += 1
                    current = {"__key__": key, "__index__": index}
                if want is None or want(index):
                    f = tar.extractfile(member)
                    current[ext] = f.read()
                    if len(current[ext]) != member.size:
                        raise tarfile.ReadError(f"member {member.name} truncated")
            if current is not None and (want is None or want(index)):
                yield current
    except GeneratorExit:
        # The consumer stopped early: a pipe: child then dies of SIGPIPE and its exit status
        # would raise from close(); that is expected, not a shard error.
        try:
            stream.close()
        except Exception:
            pass
        raise
    stream.close()  # for pipe: URLs this raises when the command failed
