"""The training dataset: scan subsets, assign buckets, plan batches per epoch, load images lazily.

Batch plan for an epoch (kohya-like), from one RNG seeded with (seed, epoch):
  for each [[datasets]] entry in order, for each of its buckets in sorted (width, height) order:
      shuffle the bucket's items (each image appears num_repeats times), cut into chunks of batch_size
      (the last, partial chunk is kept);
  then shuffle the order of all chunks.  A batch therefore never mixes buckets (nor datasets).
"""

from __future__ import annotations

import logging
import os
import random
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .buckets import BucketSelector, Size
from .captions import captions_for_images
from .config import DatasetConfig, DatasetConfigError, DatasetParams, SubsetParams, resolve_datasets
from .images import IMAGE_EXTENSIONS, ImageReadError, image_size, list_images, load_image, resize_and_crop, to_tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageItem:
    """One unique image of one subset, with everything needed to load it (no pixels)."""

    path: Path
    caption: str
    size: Size  # original (width, height), EXIF orientation applied
    bucket: Size  # training (width, height)
    resized: Size  # resized before the centre crop
    dataset_index: int
    subset_index: int
    num_repeats: int


@dataclass
class Batch:
    images: torch.Tensor  # float32 [B, 3, H, W] in [0, 1]
    captions: list[str]
    paths: list[Path]
    bucket: Size  # (width, height)
    items: list[ImageItem]


def _resolve_image_dir(sub: SubsetParams, source_dir: Path | None) -> Path:
    """kohya resolves relative paths against the working directory; we also accept the config's folder."""
    if sub.image_dir.is_dir():
        return sub.image_dir
    tried = [sub.image_dir.absolute()]
    if not sub.image_dir.is_absolute() and source_dir is not None:
        alt = source_dir / sub.image_dir
        if alt.is_dir():
            return alt
        tried.append(alt)
    raise DatasetConfigError(
        f"{sub.where}: image_dir {sub.image_dir} is not a folder (looked for {' and '.join(map(str, tried))})"
    )


class AnimaDataset:
    """Items of all datasets with their buckets; `epoch(e)` yields batches."""

    def __init__(self, params: list[DatasetParams], items: list[ImageItem], seed: int = 0):
        self.params = params
        self.items = items
        self.seed = seed
        # per dataset: bucket -> item indices with repeats, in scan order
        self._buckets: list[dict[Size, list[int]]] = [{} for _ in params]
        for idx, item in enumerate(items):
            self._buckets[item.dataset_index].setdefault(item.bucket, []).extend([idx] * item.num_repeats)
        self._num_batches = sum(
            -(-len(members) // p.batch_size) for p, b in zip(params, self._buckets) for members in b.values()
        )

    # --- sizes -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch (with repeats)."""
        return self._num_batches

    @property
    def num_images(self) -> int:
        """Unique images (an image used by two [[datasets]] counts twice)."""
        return len(self.items)

    @property
    def num_train_items(self) -> int:
        """Items per epoch, repeats included."""
        return sum(item.num_repeats for item in self.items)

    def bucket_table(self) -> list[tuple[int, int, int]]:
        """(width, height, items incl. repeats) per bucket over all datasets, sorted by (width, height)."""
        counts: dict[Size, int] = {}
        for buckets in self._buckets:
            for reso, members in buckets.items():
                counts[reso] = counts.get(reso, 0) + len(members)
        return [(w, h, n) for (w, h), n in sorted(counts.items())]

    # --- epochs ------------------------------------------------------------------------------------------
    def batch_plan(self, epoch: int) -> list[list[int]]:
        """Item indices of each batch of `epoch`, in order; deterministic in (seed, epoch)."""
        rng = random.Random(f"anima-trainer/data/{self.seed}/{epoch}")
        batches: list[list[int]] = []
        for p, buckets in zip(self.params, self._buckets):
            for reso in sorted(buckets):
                members = list(buckets[reso])
                rng.shuffle(members)
                batches.extend(members[k : k + p.batch_size] for k in range(0, len(members), p.batch_size))
        rng.shuffle(batches)
        return batches

    def load_item(self, index: int) -> torch.Tensor:
        """One image as float32 [3, H, W] in [0, 1] at its bucket size."""
        return to_tensor([self._load_pil(self.items[index])])[0]

    def _load_pil(self, item: ImageItem):
        im = load_image(item.path)
        if im.size != item.size:
            raise ImageReadError(f"{item.path} changed since the dataset was scanned ({item.size} -> {im.size})")
        return resize_and_crop(im, item.resized, item.bucket)

    def load_batch(self, indices: list[int]) -> Batch:
        items = [self.items[i] for i in indices]
        buckets = {item.bucket for item in items}
        if len(buckets) != 1:
            raise ValueError(f"a batch must come from one bucket, got {sorted(buckets)}")
        return Batch(
            images=to_tensor([self._load_pil(item) for item in items]),
            captions=[item.caption for item in items],
            paths=[item.path for item in items],
            bucket=items[0].bucket,
            items=items,
        )

    def epoch(self, epoch: int, *, prefetch: int = 0) -> Iterator[Batch]:
        """Batches of `epoch`; with prefetch > 0, that many batches are decoded ahead in a thread pool."""
        plan = self.batch_plan(epoch)
        if prefetch <= 0:
            for indices in plan:
                yield self.load_batch(indices)
            return
        pool = ThreadPoolExecutor(max_workers=min(prefetch, os.cpu_count() or 1), thread_name_prefix="anima-data")
        pending: deque[Future] = deque()
        todo = iter(plan)
        try:
            for indices in todo:
                pending.append(pool.submit(self.load_batch, indices))
                if len(pending) >= prefetch:
                    break
            while pending:
                batch = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(self.load_batch, nxt))
                yield batch
        finally:
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)


def _scan_dataset(i: int, p: DatasetParams, source_dir: Path | None) -> list[ImageItem]:
    if p.enable_bucket:
        selector = BucketSelector(p.resolution, p.min_bucket_reso, p.max_bucket_reso, p.bucket_reso_steps,
                                  no_upscale=p.bucket_no_upscale)
    else:
        selector = BucketSelector.fixed(p.resolution)
    items = []
    for j, sub in enumerate(p.subsets):
        folder = _resolve_image_dir(sub, source_dir)
        images = list_images(folder)
        if not images:
            raise DatasetConfigError(f"{sub.where}: no images ({', '.join(IMAGE_EXTENSIONS)}) in image_dir {folder}")
        captions = captions_for_images(images, sub.caption_extension, sub.class_tokens, sub.where)
        for path, caption in zip(images, captions):
            try:
                size = image_size(path)
                choice = selector.select(size)
            except (ImageReadError, ValueError) as e:
                raise DatasetConfigError(f"{sub.where}: {e} ({path})") from None
            items.append(ImageItem(path, caption, size, choice.bucket, choice.resized, i, j, sub.num_repeats))
    return items


def build_dataset(
    cfg: DatasetConfig,
    *,
    default_batch_size: int = 1,
    seed: int = 0,
    default_resolution: int | tuple[int, int] | None = None,
) -> AnimaDataset:
    """Scan every subset (image headers and caption files only) and assign buckets.

    `default_batch_size` / `default_resolution` play kohya's command-line level (`--train_batch_size`,
    `--resolution`): used when neither the subset, the dataset nor [general] sets the option."""
    params = resolve_datasets(cfg, default_batch_size=default_batch_size, default_resolution=default_resolution)
    items: list[ImageItem] = []
    for i, p in enumerate(params):
        items.extend(_scan_dataset(i, p, cfg.source_dir))
    if not items:
        raise DatasetConfigError("the dataset config yields no training images (all subsets skipped?)")
    ds = AnimaDataset(params, items, seed=seed)
    log.info("dataset: %d images, %d items with repeats, %d batches per epoch", ds.num_images,
             ds.num_train_items, len(ds))
    for w, h, n in ds.bucket_table():
        log.info("  bucket %dx%d: %d", w, h, n)
    return ds
