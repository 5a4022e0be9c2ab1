"""The training dataset: scan subsets, assign buckets, plan batches per epoch, load images lazily.

Batch plan for an epoch (kohya-like), from one RNG seeded with (seed, epoch):
  for each [[datasets]] entry in order, for each of its buckets in sorted (width, height) order:
      shuffle the bucket's items (each image appears num_repeats times), cut into chunks of batch_size
      (the last, partial chunk is kept);
  then shuffle the order of all chunks.  A batch therefore never mixes buckets (nor datasets).

Captions: `ImageItem.caption` is the raw caption; every sample of an epoch gets its own processed caption
(`captions.process_caption`: kohya's dropout / wildcard / prefix / shuffle / ...) from an RNG seeded with
(seed, epoch, item index, occurrence), occurrence = earlier appearances of the item in that epoch's batch
plan (the repeats of one image are processed independently, as in kohya).  `epoch_captions(e)` gives them
per batch of `batch_plan(e)`; `epoch(e)` puts the same ones in `Batch.captions`.

Bad data (decision): everything is checked once at start-up, so a run never dies on a file mid-way.
Files that cannot be trained on are skipped and listed in `ds.skipped` as (path, reason), with one
summary warning; files that are used with a caveat (caption not UTF-8, upscaled more than
UPSCALE_NOTE_FACTOR) are listed in `ds.notices`.  Per case:
  * unreadable / corrupt header / truncated / zero-byte / unsupported mode / above MAX_IMAGE_PIXELS /
    broken symlink / symlink loop: skipped (images.probe_image, images.scan_folder);
  * CMYK, 16-bit, palette, LA / RGBA: converted to RGB (alpha on white; images.to_rgb);
  * smaller than the bucket: upscaled, as kohya (Lanczos); with bucket_no_upscale an image with a side
    below bucket_reso_steps has no bucket and is skipped;
  * resizing to cover its bucket would need more than MAX_COVER_FACTOR x the bucket's pixels (an extreme
    aspect ratio, e.g. a 10 x 4000 strip): skipped, as the centre crop would keep a sliver of a huge resize;
  * several images with one stem in a folder (a.png + a.jpg, sharing a.txt): one is used
    (images.EXTENSION_PREFERENCE: png > webp > bmp > jpg > jpeg), the others are skipped;
  * caption files that are not UTF-8: decoded with a fallback (textfiles.py) and noted;
  * a subset left with no usable image: DatasetConfigError listing why.
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
from .captions import captions_for_images, process_caption
from .config import (
    CaptionParams,
    DatasetConfig,
    DatasetConfigError,
    DatasetParams,
    SubsetParams,
    resolve_datasets,
)
from .images import (
    IMAGE_EXTENSIONS,
    ImageInfo,
    ImageReadError,
    ImageRejected,
    load_image,
    pick_duplicate_stems,
    probe_image,
    resize_and_crop,
    scan_folder,
    to_tensor,
)
from .textfiles import collect_decode_notes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageItem:
    """One unique image of one subset, with everything needed to load it (no pixels)."""

    path: Path
    caption: str  # raw: as read (all lines with enable_wildcard), before per-sample processing
    size: Size  # original (width, height), EXIF orientation applied
    bucket: Size  # training (width, height)
    resized: Size  # resized before the centre crop
    dataset_index: int
    subset_index: int
    num_repeats: int


@dataclass
class Batch:
    images: torch.Tensor  # float32 [B, 3, H, W] in [0, 1]
    captions: list[str]  # processed for this epoch / step (items[k].caption is the raw one)
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

    def __init__(self, params: list[DatasetParams], items: list[ImageItem], seed: int = 0,
                 skipped: list[tuple[Path, str]] | None = None, notices: list[tuple[Path, str]] | None = None):
        self.params = params
        self.items = items
        self.seed = seed
        # set by the trainer: needed for a fractional token_warmup_step, and to count optimizer steps
        self.max_train_steps: int | None = None
        self.gradient_accumulation_steps = 1
        self.skipped: list[tuple[Path, str]] = list(skipped or [])  # files left out at scan, with why
        self.notices: list[tuple[Path, str]] = list(notices or [])  # files used with a caveat
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

    # --- captions ----------------------------------------------------------------------------------------
    def caption_params(self, index: int) -> CaptionParams:
        item = self.items[index]
        return self.params[item.dataset_index].subsets[item.subset_index].caption

    @property
    def captions_are_static(self) -> bool:
        """True when no subset's caption processing depends on randomness, epoch or step: then
        `caption_for(i, 0)` is item i's caption in every epoch (one text-cache entry per item suffices)."""
        return all(sub.caption.is_static for p in self.params for sub in p.subsets)

    def caption_for(self, index: int, epoch: int, step: int = 0, *, occurrence: int = 0) -> str:
        """Processed caption of item `index` in `epoch` (0-based, as in `batch_plan`); `step` = optimizer
        steps done before this sample (token warmup only; see `step_at`); `occurrence` = how many times the
        item already appeared in the epoch's batch plan.  Deterministic in (seed, epoch, index, occurrence,
        step)."""
        rng = random.Random(f"anima-trainer/captions/{self.seed}/{epoch}/{index}/{occurrence}")
        return process_caption(self.items[index].caption, self.caption_params(index), rng=rng, epoch=epoch,
                               step=step, max_train_steps=self.max_train_steps)

    def step_at(self, epoch: int, batch_number: int) -> int:
        """Optimizer steps done before batch `batch_number` of `epoch` (both 0-based), for a run that starts
        at epoch 0 and steps every `gradient_accumulation_steps` batches."""
        return (epoch * len(self) + batch_number) // max(1, self.gradient_accumulation_steps)

    def epoch_captions(self, epoch: int, plan: list[list[int]] | None = None) -> list[list[str]]:
        """Processed captions of every batch of `batch_plan(epoch)` (pass that plan to avoid recomputing
        it); exactly what `epoch(epoch)` puts in `Batch.captions`."""
        plan = self.batch_plan(epoch) if plan is None else plan
        seen: dict[int, int] = {}
        out = []
        for k, indices in enumerate(plan):
            step = self.step_at(epoch, k)
            row = []
            for i in indices:
                row.append(self.caption_for(i, epoch, step, occurrence=seen.get(i, 0)))
                seen[i] = seen.get(i, 0) + 1
            out.append(row)
        return out

    def load_item(self, index: int) -> torch.Tensor:
        """One image as float32 [3, H, W] in [0, 1] at its bucket size."""
        return to_tensor([self._load_pil(self.items[index])])[0]

    def _load_pil(self, item: ImageItem):
        im = load_image(item.path)
        if im.size != item.size:
            raise ImageReadError(f"{item.path} changed since the dataset was scanned ({item.size} -> {im.size})")
        return resize_and_crop(im, item.resized, item.bucket)

    def load_batch(self, indices: list[int], *, epoch: int | None = None, captions: list[str] | None = None) -> Batch:
        """Images of `indices`.  `Batch.captions`: `captions` if given (`epoch()` passes those of
        `epoch_captions`), else `caption_for(i, epoch)` when `epoch` is given, else the raw captions (callers
        that only want pixels, e.g. latent caching)."""
        items = [self.items[i] for i in indices]
        buckets = {item.bucket for item in items}
        if len(buckets) != 1:
            raise ValueError(f"a batch must come from one bucket, got {sorted(buckets)}")
        return Batch(
            images=to_tensor([self._load_pil(item) for item in items]),
            captions=(list(captions) if captions is not None
                      else [item.caption for item in items] if epoch is None
                      else [self.caption_for(i, epoch) for i in indices]),
            paths=[item.path for item in items],
            bucket=items[0].bucket,
            items=items,
        )

    def epoch(self, epoch: int, *, prefetch: int = 0) -> Iterator[Batch]:
        """Batches of `epoch`; with prefetch > 0, that many batches are decoded ahead in a thread pool."""
        plan = self.batch_plan(epoch)
        captions = self.epoch_captions(epoch, plan)
        if prefetch <= 0:
            for indices, caps in zip(plan, captions):
                yield self.load_batch(indices, captions=caps)
            return
        pool = ThreadPoolExecutor(max_workers=min(prefetch, os.cpu_count() or 1), thread_name_prefix="anima-data")
        pending: deque[Future] = deque()
        todo = iter(zip(plan, captions))
        try:
            for indices, caps in todo:
                pending.append(pool.submit(self.load_batch, indices, captions=caps))
                if len(pending) >= prefetch:
                    break
            while pending:
                batch = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(self.load_batch, nxt[0], captions=nxt[1]))
                yield batch
        finally:
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)


# Upscaling beyond this factor (per side) is noted in the start-up report (kohya upscales silently).
UPSCALE_NOTE_FACTOR = 2.0
# Skip an image whose cover-resize would hold more than this many times its bucket's pixels.
MAX_COVER_FACTOR = 16


class _ScanReport:
    """Skips and notices collected over all datasets; each (path, message) once, in discovery order."""

    def __init__(self) -> None:
        self.skipped: dict[tuple[Path, str], None] = {}
        self.notices: dict[tuple[Path, str], None] = {}
        self.probes: dict[tuple[Path, bool], ImageInfo | ImageRejected] = {}  # shared by datasets

    def skip(self, path: Path, reason: str) -> None:
        self.skipped[(path, reason)] = None

    def note(self, path: Path, message: str) -> None:
        self.notices[(path, message)] = None

    def probe(self, path: Path, full: bool) -> ImageInfo | ImageRejected:
        key = (path, full)
        if key not in self.probes:
            try:
                self.probes[key] = probe_image(path, full=full)
            except ImageRejected as e:
                self.probes[key] = e
        return self.probes[key]


def _summarize(entries: list[tuple[Path, str]], limit: int = 5) -> str:
    """'3 x empty file (0 bytes): a.png, b.png, c.png; 1 x symlink loop: x.png' style text."""
    by_reason: dict[str, list[Path]] = {}
    for path, reason in entries:
        key = reason.split(" (", 1)[0].split(":", 1)[0]  # group by the reason's category
        by_reason.setdefault(key, []).append(path)
    parts = []
    for reason, paths in by_reason.items():
        shown = ", ".join(str(p) for p in paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit
                                                             else "")
        parts.append(f"{len(paths)} x {reason}: {shown}")
    return "; ".join(parts)


def _scan_dataset(i: int, p: DatasetParams, source_dir: Path | None, report: _ScanReport,
                  verify_images: bool) -> list[ImageItem]:
    if p.enable_bucket:
        selector = BucketSelector(p.resolution, p.min_bucket_reso, p.max_bucket_reso, p.bucket_reso_steps,
                                  no_upscale=p.bucket_no_upscale)
    else:
        selector = BucketSelector.fixed(p.resolution)
    items = []
    for j, sub in enumerate(p.subsets):
        folder = _resolve_image_dir(sub, source_dir)
        candidates, rejected = scan_folder(folder)
        if not candidates and not rejected:
            raise DatasetConfigError(f"{sub.where}: no images ({', '.join(IMAGE_EXTENSIONS)}) in image_dir {folder}")
        usable: list[Path] = []
        infos: dict[Path, ImageInfo] = {}
        for path in candidates:
            probed = report.probe(path, verify_images)
            if isinstance(probed, ImageRejected):
                rejected.append((path, probed.reason))
            else:
                infos[path] = probed
                usable.append(path)
        usable, duplicates = pick_duplicate_stems(usable)
        rejected.extend(duplicates)
        # bucket assignment before captions, so that skipped images need no caption
        choices = {}
        for path in usable:
            size = infos[path].size
            try:
                choice = selector.select(size)
            except ValueError as e:
                rejected.append((path, f"too small: {e}"))
                continue
            bw, bh = choice.bucket
            rw, rh = choice.resized
            if rw * rh > MAX_COVER_FACTOR * bw * bh:
                reason = (f"extreme aspect ratio: {size[0]}x{size[1]} would be resized to {rw}x{rh} to cover "
                          f"bucket {bw}x{bh} (more than {MAX_COVER_FACTOR}x its pixels)")
                rejected.append((path, reason))
                continue
            if rw > UPSCALE_NOTE_FACTOR * size[0] and rh > UPSCALE_NOTE_FACTOR * size[1]:
                report.note(path, f"upscaled: {size[0]}x{size[1]} -> {rw}x{rh} ({rw / size[0]:.1f}x) for bucket "
                                  f"{bw}x{bh} (kohya semantics; bucket_no_upscale = true trains it at its own size)")
            choices[path] = choice
        rejected.sort()
        for path, reason in rejected:
            report.skip(path, reason)
        kept = [path for path in usable if path in choices]
        if not kept:
            raise DatasetConfigError(
                f"{sub.where}: no usable images in image_dir {folder}: {_summarize(rejected)}"
            )
        with collect_decode_notes() as notes:
            captions = captions_for_images(kept, sub.caption_extension, sub.class_tokens, sub.where,
                                           enable_wildcard=sub.caption.enable_wildcard)
        for path, message in notes:
            report.note(path, message)
        for path, caption in zip(kept, captions):
            choice = choices[path]
            items.append(ImageItem(path, caption, infos[path].size, choice.bucket, choice.resized, i, j,
                                   sub.num_repeats))
    return items


def build_dataset(
    cfg: DatasetConfig,
    *,
    default_batch_size: int = 1,
    seed: int = 0,
    default_resolution: int | tuple[int, int] | None = None,
    verify_images: bool = False,
) -> AnimaDataset:
    """Scan every subset (image headers, file ends and caption files only) and assign buckets.

    Unusable files are skipped and reported (module docstring); `verify_images=True` also decodes every
    image once, so that corruption inside the compressed data is caught at start-up too (slow).
    `default_batch_size` / `default_resolution` play kohya's command-line level (`--train_batch_size`,
    `--resolution`): used when neither the subset, the dataset nor [general] sets the option."""
    params = resolve_datasets(cfg, default_batch_size=default_batch_size, default_resolution=default_resolution)
    items: list[ImageItem] = []
    report = _ScanReport()
    for i, p in enumerate(params):
        items.extend(_scan_dataset(i, p, cfg.source_dir, report, verify_images))
    if not items:
        raise DatasetConfigError("the dataset config yields no training images (all subsets skipped?)")
    ds = AnimaDataset(params, items, seed=seed, skipped=list(report.skipped), notices=list(report.notices))
    if ds.skipped:
        log.warning("dataset: skipped %d file(s) that cannot be trained on (see ds.skipped): %s",
                    len(ds.skipped), _summarize(ds.skipped))
    if ds.notices:
        log.warning("dataset: %d file(s) used with a caveat (see ds.notices): %s", len(ds.notices),
                    _summarize(ds.notices))
    log.info("dataset: %d images, %d items with repeats, %d batches per epoch", ds.num_images,
             ds.num_train_items, len(ds))
    for w, h, n in ds.bucket_table():
        log.info("  bucket %dx%d: %d", w, h, n)
    return ds
