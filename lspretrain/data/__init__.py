"""WebDataset streaming data pipeline: shard writing, resumable reading, augmentations."""
from .collate import default_collate
from .config import DataConfig
from .errors import BadDataError, DataError
from .loader import StatefulLoader, build_loader
from .state import merge_states

__all__ = ["DataConfig", "build_loader", "StatefulLoader", "merge_states", "default_collate", "DataError",
           "BadDataError"]
