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
  * conditioning_data_dir (kohya's masked_loss): the mask image with the image's stem, its red channel
    / 255 (kohya's `conditioning_images[:, 0]` mapped to [0, 1]), resized, cropped and flipped like the
    pixels, is the item's `Batch.masks` entry the same way;
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
import logging
import os
import random
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .augment import ColorJitter, apply_color_jitter, draw_color_jitter
from .buckets import Size
from .captions import process_caption
from .params import CaptionParams, DatasetParams, SubsetParams
from .images import (
    ImageReadError,
    load_image,
    load_image_with_alpha,
    resize_and_crop,
    to_tensor,
)

if TYPE_CHECKING:  # data/kohya_summary.py imports this module
    from .kohya_summary import DatasetSummary

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
    # the loss-mask image of a conditioning_data_dir subset (masked_loss), same stem as `path`
    mask_path: Path | None = None
    # metadata_file subsets: the entry's tags as kohya counts them for ss_tag_frequency (metadata.MetadataEntry)
    tags: str | None = field(default=None, compare=False)


@dataclass
class Batch:
    images: torch.Tensor  # float32 [B, 3, H, W] in [0, 1]
    captions: list[str]  # processed for this epoch / step (items[k].caption is the raw one)
    paths: list[Path]
    bucket: Size  # (width, height)
    items: list[ImageItem]
    # float32 [B, 1, H, W] in [0, 1], the loss mask at image resolution (alpha_mask and conditioning_data_dir
    # subsets; 1 elsewhere); None when no item of the batch comes from such a subset
    masks: torch.Tensor | None = None
    is_reg: list[bool] = field(default_factory=list)  # per sample: a regularisation image
    flipped: list[bool] = field(default_factory=list)  # per sample: mirrored horizontally
    indices: list[int] = field(default_factory=list)  # per sample: the item's index in the dataset
    occurrences: list[int] = field(default_factory=list)  # per sample: earlier appearances in the epoch's plan


class AnimaDataset:
    """Items of all datasets with their buckets; `epoch(e)` yields batches."""

    def __init__(self, params: list[DatasetParams], items: list[ImageItem], seed: int = 0,
                 skipped: list[tuple[Path, str]] | None = None, notices: list[tuple[Path, str]] | None = None):
        self.params = params
        self.items = items
        self.seed = seed
        # the run's schedule (`scheduled`): needed for a fractional token_warmup_step, and to count optimizer steps
        self.max_train_steps: int | None = None
        self.gradient_accumulation_steps = 1
        self.skipped: list[tuple[Path, str]] = list(skipped or [])  # files left out at scan, with why
        self.notices: list[tuple[Path, str]] = list(notices or [])  # files used with a caveat
        # held out by validation_split (split_validation); not in `items`, see `validation_dataset()`
        self.validation_items: list[ImageItem] = []
        # kohya's description of each [[datasets]] entry for the file metadata (kohya_summary.py), set by the scan
        self.kohya_summary: list[DatasetSummary] | None = None
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

    def scheduled(self, max_train_steps: int, gradient_accumulation_steps: int) -> AnimaDataset:
        """This dataset for a run of `max_train_steps` optimizer steps of `gradient_accumulation_steps` batches
        (token warmup reads them): a shallow copy, this one is left as it was."""
        run = copy.copy(self)
        run.max_train_steps, run.gradient_accumulation_steps = max_train_steps, gradient_accumulation_steps
        return run

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
    def uses_mask_folders(self) -> bool:
        """True when some subset has conditioning_data_dir (loss masks for masked_loss)."""
        return any(sub.conditioning_data_dir is not None for p in self.params for sub in p.subsets)

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
        if item.mask_path is not None:
            alpha = load_image(item.mask_path).getchannel("R")
            if alpha.size != item.size:
                raise ImageReadError(f"mask {item.mask_path} changed since the dataset was scanned: "
                                     f"{alpha.size} is not its image's {item.size}")
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
        if any(self.subset_params(i).alpha_mask or self.items[i].mask_path is not None for i in indices):
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
            indices=list(indices),
            occurrences=list(occurrences),
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
