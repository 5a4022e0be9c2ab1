"""What the model sees: dataset.toml (kohya schema), images, captions, aspect-ratio buckets, batches."""

from .buckets import BucketChoice, BucketSelector, make_bucket_resolutions
from .captions import process_caption
from .config import DatasetConfig, DatasetConfigError, load_dataset_config, parse_dataset_config
from .dataset import AnimaDataset, Batch, ImageItem
from .images import IMAGE_EXTENSIONS, ImageReadError
from .params import CaptionParams, DatasetParams, SubsetParams, resolve_datasets
from .scan import build_dataset
from .validation import ValidationSet

__all__ = [
    "IMAGE_EXTENSIONS",
    "AnimaDataset",
    "Batch",
    "BucketChoice",
    "BucketSelector",
    "CaptionParams",
    "DatasetConfig",
    "DatasetConfigError",
    "DatasetParams",
    "ImageItem",
    "ImageReadError",
    "SubsetParams",
    "ValidationSet",
    "build_dataset",
    "load_dataset_config",
    "make_bucket_resolutions",
    "parse_dataset_config",
    "process_caption",
    "resolve_datasets",
]
