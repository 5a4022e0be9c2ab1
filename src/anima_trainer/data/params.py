"""Resolved per-subset parameters: kohya's precedence subset > dataset > [general] > defaults applied to a
validated `DatasetConfig` (`resolve_datasets`), giving frozen `DatasetParams` / `SubsetParams` /
`CaptionParams` that the rest of data/ reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .config import (
    ANIMA_PIXEL_MULTIPLE,
    CAPTION_KEYS,
    DEFAULTS,
    DatasetConfig,
    DatasetConfigError,
    dataset_table,
    subset_table,
)

log = logging.getLogger(__name__)


# --- precedence -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CaptionParams:
    """Per-subset caption processing options, kohya's names and defaults (kohya_anima.md §2.2).

    Empty strings for prefix / suffix / separators mean "none" (as in kohya, which tests truthiness)."""

    caption_prefix: str | None = None
    caption_suffix: str | None = None
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0  # steps; < 1 = fraction of max_train_steps

    @property
    def is_static(self) -> bool:
        """True when the processed caption depends on the raw caption only (no randomness, epoch or step):
        then it can be computed once, e.g. for a text-encoder cache."""
        return not (
            self.shuffle_caption or self.enable_wildcard or self.caption_dropout_rate > 0
            or self.caption_dropout_every_n_epochs > 0 or self.caption_tag_dropout_rate > 0
            or self.token_warmup_step > 0
        )


@dataclass(frozen=True)
class SubsetParams:
    # as written (resolved against cwd / the config folder when scanned); None: see metadata_file
    image_dir: Path | None
    num_repeats: int
    caption_extension: str
    class_tokens: str | None
    where: str  # table name for messages
    caption: CaptionParams = CaptionParams()
    metadata_file: Path | None = None  # fine-tuning style subset: images + captions from this file (metadata.py)
    resize_interpolation: str | None = None  # kohya name (RESIZE_INTERPOLATIONS); None: area down, Lanczos up
    custom_attributes: dict[str, Any] = field(default_factory=dict, hash=False)  # copied onto every item
    cache_info: bool = False  # accepted for kohya configs; no effect (see resolve_datasets)
    # augmentation (per sample, deterministic in (seed, epoch, item, occurrence); see dataset.py)
    flip_aug: bool = False  # horizontal flip with p = 0.5
    random_crop: bool = False  # random instead of centre crop of the resized image
    color_aug: bool = False  # kohya's weak hue / gamma jitter (augment.color_aug)
    is_reg: bool = False  # regularisation images (balanced against the dataset's training images)
    alpha_mask: bool = False  # the image's alpha channel is the loss mask (Batch.masks)
    conditioning_data_dir: Path | None = None  # loss-mask images, one per image stem (masked_loss; Batch.masks)

    @property
    def uses_random_pixels(self) -> bool:
        """True when the pixels of a sample vary between epochs beyond a flip (no latent cache possible)."""
        return self.random_crop or self.color_aug


@dataclass(frozen=True)
class DatasetParams:
    resolution: tuple[int, int]  # (width, height)
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    subsets: tuple[SubsetParams, ...]
    where: str
    validation_split: float = 0.0  # fraction of each (non-reg) subset held out (dataset.split_validation)
    validation_seed: int | None = None  # None: the dataset seed
    skip_image_resolution: tuple[int, int] | None = None  # skip images with w*h <= this area
    bucket_free_fit: bool = False  # per-image bucket of area <= resolution w*h, aspect kept (buckets.free_fit_bucket)

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]


def _pick(key: str, *levels: BaseModel | dict | None) -> Any:
    for level in levels:
        if level is None:
            continue
        value = level.get(key) if isinstance(level, dict) else getattr(level, key, None)
        if value is not None:
            return value
    return DEFAULTS.get(key)


def _normalize_extension(ext: str) -> str:
    # kohya appends the extension to the stem as-is; "txt" would look for "imgtxt". We add the dot.
    return ext if ext.startswith(".") or ext == "" else "." + ext


def _caption_params(where: str, *levels: BaseModel | dict | None) -> CaptionParams:
    p = CaptionParams(**{key: _pick(key, *levels) for key in CAPTION_KEYS})
    if p.keep_tokens_separator and p.keep_tokens_separator == p.caption_separator:
        raise DatasetConfigError(
            f"{where}: keep_tokens_separator must differ from caption_separator ({p.caption_separator!r}); "
            f"kohya's examples use \"|||\""
        )
    if p.secondary_separator and p.secondary_separator == p.caption_separator:
        raise DatasetConfigError(
            f"{where}: secondary_separator must differ from caption_separator ({p.caption_separator!r}); "
            f"kohya's examples use \";;;\""
        )
    if p.keep_tokens and not (p.shuffle_caption or p.caption_tag_dropout_rate > 0 or p.token_warmup_step > 0):
        log.info("%s: keep_tokens = %d has no effect without shuffle_caption, caption_tag_dropout_rate or "
                 "token_warmup_step", where, p.keep_tokens)
    return p


def _cache_info(where: str, value: bool) -> bool:
    # kohya's cache_info writes metadata_cache.json (captions + image sizes) into image_dir to speed up its
    # next start-up.  Our scan reads image headers only, so it is accepted (kohya configs work) and unused.
    if value:
        log.info("%s: cache_info = true has no effect in anima-trainer (start-up reads image headers only; "
                 "no metadata_cache.json is written)", where)
    return bool(value)


def _mask_dir(where: str, sub: Any) -> Path | None:
    """conditioning_data_dir of a subset: kohya's ControlNet-style subset, here the loss-mask folder."""
    if sub.conditioning_data_dir is None:
        return None
    if sub.metadata_file is not None:
        raise DatasetConfigError(f"{where}: conditioning_data_dir needs an image_dir subset (kohya's ControlNet-style "
                                 "subset), not metadata_file; list the images with image_dir")
    if sub.alpha_mask:
        raise DatasetConfigError(f"{where}: alpha_mask and conditioning_data_dir both give this subset's loss mask; "
                                 "keep one of them")
    return Path(sub.conditioning_data_dir)


def resolve_datasets(
    cfg: DatasetConfig,
    *,
    default_batch_size: int | None = None,
    default_resolution: int | tuple[int, int] | None = None,
    default_validation_split: float | None = None,
    default_validation_seed: int | None = None,
) -> list[DatasetParams]:
    """Apply kohya's precedence (subset > dataset > general > caller defaults > built-ins) and check
    the combinations.  Duplicate subsets (same image_dir) within one dataset are dropped, as in kohya.
    The `default_*` arguments are kohya's command-line level (train args such as `--validation_split`)."""
    if isinstance(default_resolution, int):
        default_resolution = (default_resolution, default_resolution)
    if default_validation_split is not None and not 0.0 <= default_validation_split < 1.0:
        raise DatasetConfigError(f"validation_split (train args) must be a fraction in [0, 1), got "
                                 f"{default_validation_split:g}")
    caller = {"batch_size": default_batch_size, "resolution": default_resolution,
              "validation_split": default_validation_split, "validation_seed": default_validation_seed}
    g = cfg.general
    out = []
    for i, ds in enumerate(cfg.datasets):
        where = dataset_table(i)
        resolution = _pick("resolution", ds, g, caller)
        if resolution is None:
            raise DatasetConfigError(f"{where}: 'resolution' is required (set it there or in [general])")
        steps = _pick("bucket_reso_steps", ds, g, caller)
        enable_bucket = _pick("enable_bucket", ds, g, caller)
        no_upscale = _pick("bucket_no_upscale", ds, g, caller)
        free_fit = _pick("bucket_free_fit", ds, g, caller)
        lo, hi = _pick("min_bucket_reso", ds, g, caller), _pick("max_bucket_reso", ds, g, caller)
        if free_fit and no_upscale:
            raise DatasetConfigError(
                f"{where}: bucket_free_fit = true and bucket_no_upscale = true are mutually exclusive (free fit "
                f"upscales every image to the target area; no_upscale keeps small images at their size); set one "
                f"of them to false"
            )
        if free_fit and not enable_bucket:
            log.warning("%s: bucket_free_fit = true has no effect without enable_bucket = true (every image is "
                        "trained at resolution %s); set enable_bucket = true to use it", where, list(resolution))
        if enable_bucket and not no_upscale:
            if lo % steps:
                log.warning("%s: min_bucket_reso %d rounded down to a multiple of %d", where, lo, steps)
                lo -= lo % steps
            if hi % steps:
                log.warning("%s: max_bucket_reso %d rounded up to a multiple of %d", where, hi, steps)
                hi += steps - hi % steps
            if lo < steps:
                raise DatasetConfigError(f"{where}: min_bucket_reso must be at least bucket_reso_steps ({steps})")
            if lo > min(resolution):
                raise DatasetConfigError(
                    f"{where}: min_bucket_reso ({lo}) must be <= the smaller side of resolution {list(resolution)}"
                )
            if hi < max(resolution):
                raise DatasetConfigError(
                    f"{where}: max_bucket_reso ({hi}) must be >= the larger side of resolution {list(resolution)}"
                    f"; set max_bucket_reso = {max(resolution) * 2} (typical for {max(resolution)} training)"
                )
        elif enable_bucket and no_upscale:
            log.info("%s: bucket_no_upscale set; min/max_bucket_reso are ignored", where)
        elif any(side % ANIMA_PIXEL_MULTIPLE for side in resolution):
            raise DatasetConfigError(
                f"{where}: without enable_bucket, resolution {list(resolution)} is the training size and each "
                f"side must be a multiple of {ANIMA_PIXEL_MULTIPLE} for Anima"
            )
        if free_fit and enable_bucket:  # a start-up notice: the fork option is honoured, and how
            log.info("%s: bucket_free_fit = true: each image gets its own bucket of area <= %dx%d keeping its aspect "
                     "ratio (sides in steps of %d, %d-%d px), instead of the nearest predefined bucket", where,
                     resolution[0], resolution[1], steps, lo, hi)
        subsets, seen = [], set()
        for j, sub in enumerate(ds.subsets):
            swhere = subset_table(i, j)
            source = (sub.image_dir, sub.metadata_file)
            if source in seen:
                log.warning("%s: duplicate %s %s in the same dataset; dropped (kohya)", swhere,
                            "metadata_file" if sub.metadata_file else "image_dir", sub.metadata_file or sub.image_dir)
                continue
            seen.add(source)
            repeats = _pick("num_repeats", sub, ds, g, caller)
            if repeats < 1:
                log.warning("%s: num_repeats = %d, subset skipped", swhere, repeats)
                continue
            subsets.append(
                SubsetParams(
                    image_dir=Path(sub.image_dir) if sub.image_dir is not None else None,
                    num_repeats=repeats,
                    caption_extension=_normalize_extension(_pick("caption_extension", sub, ds, g, caller)),
                    class_tokens=_pick("class_tokens", sub, ds, g, caller),
                    where=swhere,
                    caption=_caption_params(swhere, sub, ds, g, caller),
                    metadata_file=Path(sub.metadata_file) if sub.metadata_file is not None else None,
                    resize_interpolation=_pick("resize_interpolation", sub, ds, g, caller),
                    custom_attributes=dict(_pick("custom_attributes", sub, ds, g, caller) or {}),
                    cache_info=_cache_info(swhere, _pick("cache_info", sub, ds, g, caller)),
                    flip_aug=_pick("flip_aug", sub, ds, g, caller),
                    random_crop=_pick("random_crop", sub, ds, g, caller),
                    color_aug=_pick("color_aug", sub, ds, g, caller),
                    is_reg=_pick("is_reg", sub),
                    alpha_mask=_pick("alpha_mask", sub),
                    conditioning_data_dir=_mask_dir(swhere, sub),
                )
            )
        if subsets and all(s.is_reg for s in subsets):
            raise DatasetConfigError(
                f"{where}: every subset has is_reg = true; regularisation images are balanced against the "
                f"training images of the same [[datasets]] entry (kohya), so add a subset without is_reg there"
            )
        out.append(
            DatasetParams(
                resolution=tuple(resolution),
                batch_size=_pick("batch_size", ds, g, caller),
                enable_bucket=enable_bucket,
                min_bucket_reso=lo,
                max_bucket_reso=hi,
                bucket_reso_steps=steps,
                bucket_no_upscale=no_upscale,
                subsets=tuple(subsets),
                where=where,
                validation_split=_pick("validation_split", ds, g, caller),
                validation_seed=_pick("validation_seed", ds, g, caller),
                skip_image_resolution=_pick("skip_image_resolution", ds, g, caller),
                bucket_free_fit=bool(free_fit and enable_bucket),
            )
        )
    return out
