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

Augmentation (per subset; kohya semantics, deterministic like the captions, each from its own RNG seeded
with (seed, epoch, item index, occurrence), so switching one on does not change the others' draws):
  * flip_aug: horizontal flip with p = 0.5 (`flip_for`, `epoch_flips`; `load_batch(flips=...)` overrides,
    e.g. to encode flipped latents for a cache);
  * random_crop: the crop of the bucket out of the cover-resized image is at a uniform random offset
    (`crop_for`; kohya's randint(0, excess) per axis) instead of the centre; no effect where the resized
    image equals the bucket;
  * color_aug: kohya's weak hue / gamma jitter (`color_for`, augment.py), applied after the crop;
  * alpha_mask: the image's alpha channel (before compositing on white) is resized, cropped and flipped
    exactly like the pixels and returned as `Batch.masks` (1 = train on this pixel; 1 for images without
    alpha and for items of other subsets in the same batch; None when no item is from an alpha_mask subset);
  * is_reg: regularisation items (`ImageItem.is_reg`, `Batch.is_reg`; the trainer weights their loss by
    prior_loss_weight), balanced against the training items of their [[datasets]] entry by
    `balance_reg_items` (kohya's DreamBooth rule).
Without `epoch` (`load_batch(indices)`, e.g. latent caching) nothing random is applied: centre crop, no
colour jitter, no flip unless `flips` says so.  `uses_random_pixels` tells whether a latent cache is possible.

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

import copy
import hashlib
import logging
import math
import os
import random
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .augment import ColorJitter, apply_color_jitter, draw_color_jitter
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
    load_image_with_alpha,
    pick_duplicate_stems,
    probe_image,
    resize_and_crop,
    scan_folder,
    to_tensor,
)
from .metadata import MetadataEntry, read_metadata, resolve_metadata_subset
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
    num_repeats: int  # for is_reg items: after balancing (balance_reg_items)
    is_reg: bool = False  # from an is_reg subset: a regularisation image
    # the subset's custom_attributes table (a copy per item), for later code; kohya passes it to the batch
    custom_attributes: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class Batch:
    images: torch.Tensor  # float32 [B, 3, H, W] in [0, 1]
    captions: list[str]  # processed for this epoch / step (items[k].caption is the raw one)
    paths: list[Path]
    bucket: Size  # (width, height)
    items: list[ImageItem]
    # float32 [B, 1, H, W] in [0, 1], the loss mask at image resolution (alpha_mask subsets; 1 elsewhere);
    # None when no item of the batch comes from an alpha_mask subset
    masks: torch.Tensor | None = None
    is_reg: list[bool] = field(default_factory=list)  # per sample: a regularisation image
    flipped: list[bool] = field(default_factory=list)  # per sample: mirrored horizontally


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
        # held out by validation_split (split_validation); not in `items`, see `validation_dataset()`
        self.validation_items: list[ImageItem] = []
        # per dataset: bucket -> item indices with repeats, in scan order
        self._buckets: list[dict[Size, list[int]]] = [{} for _ in params]
        for idx, item in enumerate(items):
            self._buckets[item.dataset_index].setdefault(item.bucket, []).extend([idx] * item.num_repeats)
        self._num_batches = sum(
            -(-len(members) // p.batch_size) for p, b in zip(params, self._buckets) for members in b.values()
        )

    def validation_dataset(self) -> AnimaDataset | None:
        """The held-out items as a dataset of their own (same params, buckets, loading and captions), or None
        without validation_split."""
        if not self.validation_items:
            return None
        return AnimaDataset(self.params, list(self.validation_items), seed=self.seed)

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
    def subset_params(self, index: int) -> SubsetParams:
        item = self.items[index]
        return self.params[item.dataset_index].subsets[item.subset_index]

    def caption_params(self, index: int) -> CaptionParams:
        return self.subset_params(index).caption

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

    # --- augmentation ------------------------------------------------------------------------------------
    @property
    def uses_flip(self) -> bool:
        """True when some subset has flip_aug (a latent cache then needs the flipped latents too)."""
        return any(sub.flip_aug for p in self.params for sub in p.subsets)

    @property
    def uses_random_pixels(self) -> bool:
        """True when some subset has random_crop or color_aug: the pixels change every epoch beyond a flip,
        so latents cannot be cached (kohya refuses the combination too)."""
        return any(sub.uses_random_pixels for p in self.params for sub in p.subsets)

    @property
    def uses_alpha_mask(self) -> bool:
        """True when some subset has alpha_mask (some batches then carry `Batch.masks`)."""
        return any(sub.alpha_mask for p in self.params for sub in p.subsets)

    @property
    def uses_reg(self) -> bool:
        """True when some item is a regularisation image (the trainer applies prior_loss_weight)."""
        return any(item.is_reg for item in self.items)

    def _rng(self, kind: str, index: int, epoch: int, occurrence: int) -> random.Random:
        return random.Random(f"anima-trainer/{kind}/{self.seed}/{epoch}/{index}/{occurrence}")

    def flip_for(self, index: int, epoch: int, *, occurrence: int = 0) -> bool:
        """Whether item `index` is mirrored in `epoch` (p = 0.5 with flip_aug, else never); deterministic in
        (seed, epoch, index, occurrence) as `caption_for`."""
        if not self.subset_params(index).flip_aug:
            return False
        return self._rng("flip", index, epoch, occurrence).random() < 0.5

    def crop_for(self, index: int, epoch: int | None = None, *, occurrence: int = 0) -> tuple[int, int]:
        """(left, top) of the bucket-sized crop in the resized image of item `index`: uniform over the valid
        range with random_crop and an epoch, else the centre crop."""
        item = self.items[index]
        (rw, rh), (bw, bh) = item.resized, item.bucket
        if epoch is None or not self.subset_params(index).random_crop:
            return (rw - bw) // 2, (rh - bh) // 2
        rng = self._rng("crop", index, epoch, occurrence)
        return rng.randint(0, rw - bw), rng.randint(0, rh - bh)

    def color_for(self, index: int, epoch: int, *, occurrence: int = 0) -> ColorJitter | None:
        """The colour jitter of item `index` in `epoch` (None: unchanged; always None without color_aug)."""
        if not self.subset_params(index).color_aug:
            return None
        return draw_color_jitter(self._rng("color", index, epoch, occurrence))

    @staticmethod
    def plan_occurrences(plan: list[list[int]]) -> list[list[int]]:
        """Per batch of `plan`, how many times each item already appeared earlier in the plan."""
        seen: dict[int, int] = {}
        out = []
        for indices in plan:
            row = []
            for i in indices:
                row.append(seen.get(i, 0))
                seen[i] = seen.get(i, 0) + 1
            out.append(row)
        return out

    def epoch_flips(self, epoch: int, plan: list[list[int]] | None = None) -> list[list[bool]]:
        """Flips of every batch of `batch_plan(epoch)` (pass that plan to avoid recomputing it); exactly what
        `epoch(epoch)` uses (`Batch.flipped`)."""
        plan = self.batch_plan(epoch) if plan is None else plan
        return [[self.flip_for(i, epoch, occurrence=o) for i, o in zip(indices, occ, strict=True)]
                for indices, occ in zip(plan, self.plan_occurrences(plan), strict=True)]

    # --- loading -----------------------------------------------------------------------------------------
    def load_item(self, index: int) -> torch.Tensor:
        """One image as float32 [3, H, W] in [0, 1] at its bucket size (centre crop, no augmentation)."""
        return to_tensor([self._load_sample(index)[0]])[0]

    def _load_sample(self, index: int, epoch: int | None = None, occurrence: int = 0,
                     flip: bool = False) -> tuple[Image.Image, Image.Image | None]:
        """(RGB pixels, alpha mask "L" image or None) of one sample at its bucket size, augmented."""
        item = self.items[index]
        sub = self.subset_params(index)
        im, alpha = load_image_with_alpha(item.path, alpha=sub.alpha_mask)
        if im.size != item.size:
            raise ImageReadError(f"{item.path} changed since the dataset was scanned ({item.size} -> {im.size})")
        offset = self.crop_for(index, epoch, occurrence=occurrence)
        im = resize_and_crop(im, item.resized, item.bucket, offset, interpolation=sub.resize_interpolation)
        if alpha is not None:
            alpha = resize_and_crop(alpha, item.resized, item.bucket, offset, interpolation=sub.resize_interpolation)
        if epoch is not None:
            jitter = self.color_for(index, epoch, occurrence=occurrence)
            if jitter is not None:
                im = apply_color_jitter(im, jitter)
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if alpha is not None:
                alpha = alpha.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return im, alpha

    def load_batch(self, indices: list[int], *, epoch: int | None = None, captions: list[str] | None = None,
                   flips: list[bool] | None = None, occurrences: list[int] | None = None) -> Batch:
        """Images of `indices`.  `Batch.captions`: `captions` if given (`epoch()` passes those of
        `epoch_captions`), else `caption_for(i, epoch)` when `epoch` is given, else the raw captions (callers
        that only want pixels, e.g. latent caching).

        With `epoch`, the sample's augmentation of that epoch is applied (flip, random crop, colour jitter);
        `occurrences` = earlier appearances of each item in the epoch's plan (`plan_occurrences`; default:
        earlier appearances within `indices`).  Without `epoch`: centre crop, no jitter, no flip.  `flips`,
        when given, overrides the flip draw (e.g. `[True] * n` for flipped latents of a cache)."""
        items = [self.items[i] for i in indices]
        buckets = {item.bucket for item in items}
        if len(buckets) != 1:
            raise ValueError(f"a batch must come from one bucket, got {sorted(buckets)}")
        if occurrences is None:
            occurrences = self.plan_occurrences([list(indices)])[0]
        if len(occurrences) != len(indices) or (flips is not None and len(flips) != len(indices)):
            raise ValueError("flips / occurrences must have one entry per index")
        if flips is None:
            flips = ([False] * len(indices) if epoch is None
                     else [self.flip_for(i, epoch, occurrence=o) for i, o in zip(indices, occurrences)])
        samples = [self._load_sample(i, epoch, o, bool(f)) for i, o, f in zip(indices, occurrences, flips)]
        masks = None
        if any(self.subset_params(i).alpha_mask for i in indices):
            w, h = items[0].bucket
            masks = torch.ones(len(indices), 1, h, w)
            for k, (_, alpha) in enumerate(samples):
                if alpha is not None:
                    masks[k, 0] = torch.from_numpy(np.array(alpha, dtype=np.uint8)).float().div_(255.0)
        return Batch(
            images=to_tensor([im for im, _ in samples]),
            captions=(list(captions) if captions is not None
                      else [item.caption for item in items] if epoch is None
                      else [self.caption_for(i, epoch, occurrence=o) for i, o in zip(indices, occurrences)]),
            paths=[item.path for item in items],
            bucket=items[0].bucket,
            items=items,
            masks=masks,
            is_reg=[item.is_reg for item in items],
            flipped=[bool(f) for f in flips],
        )

    def epoch(self, epoch: int, *, prefetch: int = 0) -> Iterator[Batch]:
        """Batches of `epoch`; with prefetch > 0, that many batches are decoded ahead in a thread pool."""
        plan = self.batch_plan(epoch)
        captions = self.epoch_captions(epoch, plan)
        occurrences = self.plan_occurrences(plan)
        flips = self.epoch_flips(epoch, plan)

        def load(k: int) -> Batch:
            return self.load_batch(plan[k], epoch=epoch, captions=captions[k], flips=flips[k],
                                   occurrences=occurrences[k])

        if prefetch <= 0:
            for k in range(len(plan)):
                yield load(k)
            return
        pool = ThreadPoolExecutor(max_workers=min(prefetch, os.cpu_count() or 1), thread_name_prefix="anima-data")
        pending: deque[Future] = deque()
        todo = iter(range(len(plan)))
        try:
            for k in todo:
                pending.append(pool.submit(load, k))
                if len(pending) >= prefetch:
                    break
            while pending:
                batch = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(load, nxt))
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


SKIP_RESOLUTION_REASON = "below skip_image_resolution"


def _resolve_file(path: Path, source_dir: Path | None, what: str, where: str) -> Path:
    """A file named in the config: as written (cwd), else relative to the config's folder."""
    if path.is_file():
        return path
    tried = [path.absolute()]
    if not path.is_absolute() and source_dir is not None:
        if (source_dir / path).is_file():
            return source_dir / path
        tried.append(source_dir / path)
    raise DatasetConfigError(f"{where}: {what} {path} is not a file (looked for {' and '.join(map(str, tried))})")


def _metadata_subset(sub: SubsetParams, source_dir: Path | None
                     ) -> tuple[dict[Path, MetadataEntry], list[tuple[Path, str]], str]:
    """(image path -> entry, rejected, description) of a metadata_file subset (metadata.py)."""
    metadata_file = _resolve_file(sub.metadata_file, source_dir, "metadata_file", sub.where)
    image_dir = _resolve_image_dir(sub, source_dir) if sub.image_dir is not None else None
    entries = read_metadata(metadata_file, separator=sub.caption.caption_separator,
                            enable_wildcard=sub.caption.enable_wildcard)
    if not entries:
        raise DatasetConfigError(f"{sub.where}: metadata_file {metadata_file} lists no images")
    meta: dict[Path, MetadataEntry] = {}
    rejected: list[tuple[Path, str]] = []
    for path, entry in resolve_metadata_subset(entries, image_dir, metadata_file, sub.where):
        if path in meta:
            reason = (f"duplicate entry: {entry.key!r} ({entry.where}) is the same file as {meta[path].key!r} "
                      f"({meta[path].where}), which is used")
            rejected.append((path, reason))
        else:
            meta[path] = entry
    return meta, rejected, f"metadata_file {metadata_file}"


def split_validation(params: list[DatasetParams], items: list[ImageItem], seed: int = 0
                     ) -> tuple[list[ImageItem], list[ImageItem]]:
    """(training items, validation items), both in scan order, by each dataset's validation_split (kohya:
    per subset; reg subsets are never split).  Per subset, floor(n * validation_split) of its n usable
    images are held out: those with the smallest sha256(validation_seed (else `seed`), file name, path).
    So the split does not depend on scan order, and the same image_dir in several [[datasets]]
    (multi-resolution) holds out the same images."""
    groups: dict[tuple[int, int], list[int]] = {}
    for k, item in enumerate(items):
        groups.setdefault((item.dataset_index, item.subset_index), []).append(k)
    held: set[int] = set()
    for (d, s), members in groups.items():
        p, sub = params[d], params[d].subsets[s]
        if p.validation_split <= 0 or getattr(sub, "is_reg", False):
            continue
        n_val = math.floor(len(members) * p.validation_split + 1e-9)
        if n_val == 0:
            log.warning("%s: validation_split %g of %d image(s) holds out none", sub.where, p.validation_split,
                        len(members))
            continue
        vseed = p.validation_seed if p.validation_seed is not None else seed

        def rank(k: int, vseed: int = vseed) -> str:
            return hashlib.sha256(f"{vseed}/{items[k].path.name}/{items[k].path}".encode()).hexdigest()

        held.update(sorted(members, key=rank)[:n_val])
        log.info("%s: %d of %d image(s) held out for validation", sub.where, n_val, len(members))
    return ([item for k, item in enumerate(items) if k not in held],
            [item for k, item in enumerate(items) if k in held])


def _scan_dataset(i: int, p: DatasetParams, source_dir: Path | None, report: _ScanReport,
                  verify_images: bool) -> list[ImageItem]:
    if p.enable_bucket:
        selector = BucketSelector(p.resolution, p.min_bucket_reso, p.max_bucket_reso, p.bucket_reso_steps,
                                  no_upscale=p.bucket_no_upscale)
    else:
        selector = BucketSelector.fixed(p.resolution)
    items = []
    skip_area = p.skip_image_resolution[0] * p.skip_image_resolution[1] if p.skip_image_resolution else 0
    for j, sub in enumerate(p.subsets):
        meta: dict[Path, MetadataEntry] | None = None  # fine-tuning style subset: path -> metadata entry
        if sub.metadata_file is not None:
            meta, rejected, source = _metadata_subset(sub, source_dir)
            candidates = list(meta)
        else:
            folder = _resolve_image_dir(sub, source_dir)
            source = f"image_dir {folder}"
            candidates, rejected = scan_folder(folder)
            if not candidates and not rejected:
                raise DatasetConfigError(f"{sub.where}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {source}")
        usable: list[Path] = []
        infos: dict[Path, ImageInfo] = {}
        for path in candidates:
            probed = report.probe(path, verify_images)
            if isinstance(probed, ImageRejected):
                rejected.append((path, probed.reason))
            else:
                infos[path] = probed
                usable.append(path)
        if meta is None:  # caption files: one image per stem (metadata entries have their own captions)
            usable, duplicates = pick_duplicate_stems(usable)
            rejected.extend(duplicates)
        # bucket assignment before captions, so that skipped images need no caption
        choices = {}
        for path in usable:
            size = infos[path].size
            if p.skip_image_resolution is not None and size[0] * size[1] <= skip_area:
                sw, sh = p.skip_image_resolution
                reason = f"{SKIP_RESOLUTION_REASON}: {size[0]}x{size[1]} has at most the {sw}x{sh} area of {p.where}"
                rejected.append((path, reason))
                continue
            if meta is not None and meta[path].image_size not in (None, size):
                mw, mh = meta[path].image_size
                report.note(path, f"image_size {mw}x{mh} in {meta[path].where} differs from the file's "
                                  f"{size[0]}x{size[1]}; the file's size is used")
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
        if not kept and rejected and all(r.startswith(SKIP_RESOLUTION_REASON) for _, r in rejected):
            log.warning("%s: every image of %s is at or below skip_image_resolution; subset unused", sub.where,
                        source)
            continue
        if not kept:
            raise DatasetConfigError(
                f"{sub.where}: no usable images in {source}: {_summarize(rejected)}"
            )
        with collect_decode_notes() as notes:
            captions = ([meta[path].caption for path in kept] if meta is not None
                        else captions_for_images(kept, sub.caption_extension, sub.class_tokens, sub.where,
                                                 enable_wildcard=sub.caption.enable_wildcard))
        for path, message in notes:
            report.note(path, message)
        for path, caption in zip(kept, captions):
            choice = choices[path]
            items.append(ImageItem(path, caption, infos[path].size, choice.bucket, choice.resized, i, j,
                                   sub.num_repeats, custom_attributes=copy.deepcopy(sub.custom_attributes)))
    return items


def balance_reg_items(params: list[DatasetParams], items: list[ImageItem]) -> list[ImageItem]:
    """Mark regularisation items (`is_reg`) and balance them as kohya's DreamBooth dataset does, per
    [[datasets]] entry: T = training items of the entry (images x num_repeats, non-reg subsets).  The reg
    images (subset order, then file order) are cycled: the first pass gives each its own num_repeats, every
    later pass adds one repeat to each in turn; it stops as soon as the reg items reach T.  So reg items
    ~= T (more when the first pass overshoots), and reg images beyond T on the first pass are not used at
    all (warning).  Returns the items in their original order, unused reg images left out."""
    out: list[ImageItem] = []
    for d, p in enumerate(params):
        mine = [item for item in items if item.dataset_index == d]
        reg_flags = [p.subsets[item.subset_index].is_reg for item in mine]
        num_train = sum(item.num_repeats for item, reg in zip(mine, reg_flags) if not reg)
        reg = [k for k, flag in enumerate(reg_flags) if flag]
        repeats: dict[int, int] = {}
        n, first = 0, True
        while reg and n < num_train:
            for k in reg:
                if first:
                    repeats[k] = mine[k].num_repeats
                    n += mine[k].num_repeats
                else:
                    repeats[k] += 1
                    n += 1
                if n >= num_train:
                    break
            first = False
        for k, item in enumerate(mine):
            if not reg_flags[k]:
                out.append(replace(item, is_reg=False) if item.is_reg else item)
            elif k in repeats:
                out.append(replace(item, is_reg=True, num_repeats=repeats[k]))
        if reg:
            unused = len(reg) - len(repeats)
            log.info("%s: %d regularisation image(s) balanced to %d reg items against %d training items",
                     p.where, len(repeats), n, num_train)
            if unused:
                log.warning("%s: %d of %d regularisation image(s) not used: there are more reg items than "
                            "training items (kohya's balancing)", p.where, unused, len(reg))
    return out


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
    items, validation_items = split_validation(params, items, seed)
    items = balance_reg_items(params, items)
    if not items:
        raise DatasetConfigError("the dataset config yields no training images (all subsets skipped?)")
    ds = AnimaDataset(params, items, seed=seed, skipped=list(report.skipped), notices=list(report.notices))
    ds.validation_items = validation_items
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
