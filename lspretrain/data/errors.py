"""Exceptions raised by the data pipeline."""


class DataError(RuntimeError):
    """The data cannot support a meaningful run (no shards, no samples, incompatible state)."""


class BadDataError(DataError):
    """Too many bad samples: the configured ``max_bad_fraction`` was exceeded.

    ``summary``: one line (the fraction and the worst shards); ``str()``: the full report."""

    def __init__(self, message: str, summary: str = ""):
        super().__init__(message)
        self.summary = summary or message.splitlines()[0]
