"""What the model sees: dataset.toml (kohya schema), images, captions, aspect-ratio buckets, batches.

    augment.py        kohya's `color_aug` (weak hue / gamma jitter)
    buckets.py        aspect-ratio buckets with kohya's rules
    captions.py       caption files and kohya's caption processing (shuffle, dropout, keep tokens, wildcards)
    config.py         dataset.toml: kohya's [general] / [[datasets]] / [[datasets.subsets]] schema, validated
    dataset.py        AnimaDataset: items, per-epoch batch plan, captions, flips and crops, lazy image loading
    images.py         image files: discovery, header-only probing, bad-data rejection, decoding
    kohya_summary.py  what kohya records about the data in a saved file's metadata
    loader.py         batches decoded in persistent worker processes
    metadata.py       fine-tuning subsets listed in a metadata_file (JSON / JSONL)
    params.py         per-subset parameters with kohya's precedence resolved
    scan.py           a dataset config scanned into items (`build_dataset`), and the bad-data report
    textfiles.py      small text files in whatever encoding, with notes on the ones that were not UTF-8
    validation.py     the held-out images (validation_split): `ValidationSet.from_dataset(dataset)`
"""

from .buckets import BucketChoice, BucketSelector, make_bucket_resolutions
from .captions import process_caption
from .config import DatasetConfig, DatasetConfigError, load_dataset_config, parse_dataset_config
from .dataset import AnimaDataset, Batch, ImageItem
from .images import IMAGE_EXTENSIONS, ImageReadError
from .params import CaptionParams, DatasetParams, SubsetParams, resolve_datasets
from .scan import build_dataset, build_run_dataset
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
    "build_run_dataset",
    "load_dataset_config",
    "make_bucket_resolutions",
    "parse_dataset_config",
    "process_caption",
    "resolve_datasets",
]
