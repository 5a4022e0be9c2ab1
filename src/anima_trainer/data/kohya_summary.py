"""What kohya records about the training data in a saved file's metadata, computed from our scan.

kohya-ss/sd-scripts (library/train_util.py, train_network.py) describes each dataset with counts taken while it
scans: `set_tag_frequency` per subset folder, `subset.img_count`, the dataset's `num_train_images` /
`num_reg_images` (images × num_repeats, regularisation images before they are balanced) and `bucket_info`.  The
same numbers are derived here so that `ss_tag_frequency`, `ss_dataset_dirs` and `ss_datasets` read as kohya's:

* tag frequency, per subset: the key is the basename of the subset's `image_dir` (caption-file subsets) or of
  its `metadata_file`; each image's raw caption (kohya: the first line, or with enable_wildcard all non-empty
  lines joined by newlines; class_tokens or "" without a caption file; prefix/suffix not included) — for a
  metadata_file subset only the entries' `tags` — is split at "," (always a comma, whatever caption_separator
  says), each piece stripped and lower-cased, empty pieces dropped, and counted once per image (repeats do not
  count).  Subsets of one dataset with the same basename add into one table; regularisation subsets count too.
* held-out validation images are not counted (kohya splits before it reads captions); a subset left with no
  image is not listed (kohya ignores it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .params import DatasetParams, SubsetParams

if TYPE_CHECKING:
    from .dataset import AnimaDataset, ImageItem


@dataclass(frozen=True)
class SubsetSummary:
    index: int  # the subset's position in its [[datasets.subsets]]
    img_count: int  # images (validation part held out; regularisation images before balancing)


@dataclass(frozen=True)
class DatasetSummary:
    subsets: tuple[SubsetSummary, ...]  # the subsets that have images, in config order
    num_train_images: int  # non-reg images × num_repeats
    num_reg_images: int  # reg images × num_repeats (before balancing)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)


def count_tags(captions: Iterable[str], into: dict[str, int] | None = None) -> dict[str, int]:
    """kohya's `set_tag_frequency` on one list of captions: comma-split, stripped, lower-cased, counted."""
    counts = into if into is not None else {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip()
            if tag:
                tag = tag.lower()
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def subset_dir_name(sub: SubsetParams) -> str:
    """kohya's name of a subset in the metadata: the basename of its metadata_file, else of its image_dir."""
    source = sub.metadata_file if sub.metadata_file is not None else sub.image_dir
    return Path(source).name if source is not None else ""


def summarize_datasets(params: list[DatasetParams], items: list[ImageItem]) -> list[DatasetSummary]:
    """One `DatasetSummary` per [[datasets]] entry; `items` after the validation split, before reg balancing."""
    out = []
    for d, p in enumerate(params):
        by_subset: dict[int, list[ImageItem]] = {}
        for item in items:
            if item.dataset_index == d:
                by_subset.setdefault(item.subset_index, []).append(item)
        subsets, freq, train, reg = [], {}, 0, 0
        for j, sub in enumerate(p.subsets):
            mine = by_subset.get(j, [])
            if not mine:
                continue
            subsets.append(SubsetSummary(j, len(mine)))
            if sub.is_reg:
                reg += len(mine) * sub.num_repeats
            else:
                train += len(mine) * sub.num_repeats
            texts = ([i.tags for i in mine if i.tags is not None] if sub.metadata_file is not None
                     else [i.caption for i in mine])
            count_tags(texts, freq.setdefault(subset_dir_name(sub), {}))
        out.append(DatasetSummary(tuple(subsets), train, reg, freq))
    return out


def bucket_info(ds: AnimaDataset, dataset_index: int) -> dict | None:
    """kohya's `dataset.bucket_info`: the used buckets sorted by (width, height), numbered from 0, with their
    item counts (repeats and balanced reg images included), and the mean |bucket aspect − image aspect| over
    the dataset's images; None when the dataset has enable_bucket off (kohya's value then)."""
    if not ds.params[dataset_index].enable_bucket:
        return None
    counts: dict[tuple[int, int], int] = {}
    errors = []
    for item in ds.items:
        if item.dataset_index == dataset_index:
            counts[item.bucket] = counts.get(item.bucket, 0) + item.num_repeats
            errors.append(abs(item.bucket[0] / item.bucket[1] - item.size[0] / item.size[1]))
    buckets = {i: {"resolution": list(reso), "count": n} for i, (reso, n) in enumerate(sorted(counts.items()))}
    return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0}


def dataset_summaries(ds: AnimaDataset) -> list[DatasetSummary]:
    """The scan's summaries; for a dataset built directly (tests), computed from its items (reg images as
    balanced)."""
    return ds.kohya_summary if ds.kohya_summary is not None else summarize_datasets(ds.params, ds.items)
