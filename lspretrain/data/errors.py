"""Exceptions raised by the data pipeline."""


class DataError(RuntimeError):
    """The data cannot support a meaningful run (no shards, no samples, incompatible state)."""


class BadDataError(DataError):
    """Too many bad samples: the configured ``max_bad_fraction`` was exceeded."""
