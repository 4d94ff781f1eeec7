"""WebDataset streaming data pipeline: shard writing, resumable reading, augmentations.

See docs/DATA.md for the design and the resume guarantees.
"""
from .augment import DINOv2MultiCrop, EvalTransform, SimpleRandomCrop, ThreeAugment
from .collate import DINOv2Collate, SupervisedCollate, default_collate
from .config import DataConfig
from .errors import BadDataError, DataError
from .loader import StatefulLoader, build_loader
from .masking import MaskingGenerator
from .mixup import MixupCutmix
from .photometric import DINOv2Photometric, ThreeAugmentPhotometric
from .mosaic import fashion_mnist_mosaic_shards
from .shard_writer import IGNORE_INDEX, EncodeOptions, Item, MaskOptions, fashion_mnist_shards, write_shards
from .state import merge_states

__all__ = [
    "DataConfig", "build_loader", "StatefulLoader", "merge_states", "DataError", "BadDataError",
    "DINOv2MultiCrop", "DINOv2Collate", "MaskingGenerator", "DINOv2Photometric",
    "ThreeAugment", "SimpleRandomCrop", "ThreeAugmentPhotometric", "SupervisedCollate", "MixupCutmix",
    "EvalTransform", "default_collate", "write_shards", "fashion_mnist_shards", "EncodeOptions", "Item",
    "MaskOptions", "IGNORE_INDEX", "fashion_mnist_mosaic_shards",
]
