"""dataset.toml: kohya's three-level schema ([general] / [[datasets]] / [[datasets.subsets]]), validated.

Loading happens in two steps:

1. `load_dataset_config` / `parse_dataset_config` check every key by hand first (so a typo, a key in the
   wrong table or a kohya option that cannot be honoured gets a message naming the key, the table and the
   fix), then build the pydantic `DatasetConfig`.  Every option is Optional there: `None` means "not set
   at this level".
2. `resolve_datasets` applies kohya's precedence, subset > dataset > general > caller defaults (kohya's
   command-line level) > built-in defaults, and returns plain frozen dataclasses the data pipeline reads.

Adding a kohya option later = move its name from a `*_NOT_IMPLEMENTED` set to a model + the resolved
dataclass; the key checks follow automatically.
"""

from __future__ import annotations

import difflib
import logging
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator

log = logging.getLogger(__name__)

# DiT patch size 2 x VAE downscale 8: every bucket side must be a multiple of this.
ANIMA_PIXEL_MULTIPLE = 16

# Fixed sanity limits (docs/training.md "Limits"; the start-up budget in train/budget.py adds the machine's memory).
MAX_RESOLUTION_SIDE = 4096  # px per side of `resolution`: 4096² = 65536 image tokens, the DiT's RoPE range
MAX_BUCKET_SIDE = 8192  # px: max_bucket_reso (2 × the largest resolution, kohya's usual ratio)
MAX_NUM_REPEATS = 10_000  # per subset
MAX_EPOCH_ITEMS = 1_000_000  # images × repeats of one epoch (the epoch's plan is held in memory)
MAX_CAPTION_BYTES = 65_536  # UTF-8 bytes of one caption (~16 000 tokens; the token limit is checked later)


class DatasetConfigError(ValueError):
    """A mistake in the dataset config or in the files it points at (message names the key / file and fix)."""


# --- key tables (kohya names) ---------------------------------------------------------------------------

# Dataset-level: allowed in [general] and [[datasets]], not in subsets.
DATASET_KEYS = frozenset(
    {"resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
     "bucket_no_upscale", "bucket_free_fit", "validation_split", "validation_seed", "skip_image_resolution"}
)
# Caption processing (kohya_anima.md §2.2/§2.3; applied per step by captions.process_caption).
CAPTION_KEYS = frozenset(
    {"caption_prefix", "caption_suffix", "shuffle_caption", "caption_separator", "keep_tokens",
     "keep_tokens_separator", "secondary_separator", "enable_wildcard", "caption_dropout_rate",
     "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "token_warmup_min", "token_warmup_step"}
)
# Image augmentation (kohya_anima.md §2.2; applied per sample by dataset.AnimaDataset / augment.py).
AUGMENT_KEYS = frozenset({"flip_aug", "random_crop", "color_aug"})
# Subset options that may also be set at dataset / general level ("ascendable" in kohya).
ASCENDABLE_KEYS = frozenset({"num_repeats", "caption_extension", "class_tokens"}) | CAPTION_KEYS | AUGMENT_KEYS
# Only inside [[datasets.subsets]] (kohya's DreamBooth "distinct" subset keys).
SUBSET_ONLY_KEYS = frozenset({"image_dir", "is_reg", "alpha_mask", "conditioning_data_dir"})
# More subset options that may be set at any level, and the fine-tuning style subset's metadata file
# (kohya_anima.md §2.2; read by dataset.py / metadata.py).
MISC_SUBSET_KEYS = frozenset({"resize_interpolation", "custom_attributes", "cache_info"})
ASCENDABLE_KEYS |= MISC_SUBSET_KEYS
SUBSET_ONLY_KEYS |= {"metadata_file"}
# DreamBooth-only subset options: an error when written inside a metadata_file subset (as in kohya).
DREAMBOOTH_ONLY_KEYS = frozenset({"caption_extension", "class_tokens"})

# kohya's resize_interpolation names -> Pillow filter names (images.resize_and_crop).  Pillow has no
# OpenCV INTER_AREA; its BOX filter is the same area average when shrinking (also our default for shrinking).
RESIZE_INTERPOLATIONS = {
    "lanczos": "LANCZOS", "nearest": "NEAREST", "bilinear": "BILINEAR", "linear": "BILINEAR",
    "bicubic": "BICUBIC", "cubic": "BICUBIC", "area": "BOX", "box": "BOX",
}

# kohya options whose honouring is impossible here and whose dropping would change the result: an error saying why
# and the fix (the compatibility rule, docs/migration.md).
UNSUPPORTED_KEYS: dict[str, str] = {
    "network_multiplier": (
        "kohya trains that dataset with the LoRA at another strength (differential training); anima-trainer trains "
        "every dataset at strength 1.0, so ignoring it would change the result: remove it, or split the run by "
        "dataset"
    ),
    "face_crop_aug_range": (
        "kohya's face crop reads face coordinates encoded in each image's file name (name_cx_cy_w_h.png, "
        "written by its face-detection preprocessing script), which anima-trainer does not read; remove "
        "the option (random_crop = true gives a random crop augmentation)"
    ),
}

GENERAL_TABLE = "[general]"

DEFAULTS: dict[str, Any] = {
    "batch_size": 1,
    "enable_bucket": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": False,
    "bucket_free_fit": False,  # beautifulrem/sd-scripts fork: per-image bucket (buckets.free_fit_bucket)
    "num_repeats": 1,
    "caption_extension": ".caption",  # kohya's DreamBooth default
    "class_tokens": None,
    # caption processing: kohya's defaults (see CaptionParams)
    "caption_prefix": None,
    "caption_suffix": None,
    "shuffle_caption": False,
    "caption_separator": ",",
    "keep_tokens": 0,
    "keep_tokens_separator": None,
    "secondary_separator": None,
    "enable_wildcard": False,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0,
    "token_warmup_min": 1,
    "token_warmup_step": 0.0,
    # misc subset / dataset options (kohya's defaults)
    "resize_interpolation": None,
    "custom_attributes": None,
    "cache_info": False,
    "validation_split": 0.0,
    "validation_seed": None,
    "skip_image_resolution": None,
    # augmentation and subset kinds (kohya's defaults)
    "flip_aug": False,
    "random_crop": False,
    "color_aug": False,
    "is_reg": False,
    "alpha_mask": False,
    "conditioning_data_dir": None,  # loss-mask folder (kohya's masked_loss), same stems as image_dir
}


def dataset_table(i: int) -> str:
    return f"[[datasets]] #{i + 1}"


def subset_table(i: int, j: int) -> str:
    return f"{dataset_table(i)} > [[datasets.subsets]] #{j + 1}"


# --- pydantic models --------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _as_number(v: Any) -> float:
    # TOML gives int or float; bools and strings are mistakes (pydantic's lax float would accept them)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"expected a number, got {type(v).__name__} {v!r}")  # noqa: TRY004 - pydantic wants ValueError
    return float(v)


class _Ascendable(_Strict):
    num_repeats: StrictInt | None = Field(default=None, ge=0)
    caption_extension: StrictStr | None = None
    class_tokens: StrictStr | None = None
    # caption processing ("" for a prefix / suffix / separator means "none", so a subset can switch off
    # what [general] sets)
    caption_prefix: StrictStr | None = None
    caption_suffix: StrictStr | None = None
    shuffle_caption: StrictBool | None = None
    caption_separator: StrictStr | None = None
    keep_tokens: StrictInt | None = Field(default=None, ge=0)
    keep_tokens_separator: StrictStr | None = None
    secondary_separator: StrictStr | None = None
    enable_wildcard: StrictBool | None = None
    caption_dropout_rate: float | None = None
    caption_dropout_every_n_epochs: StrictInt | None = Field(default=None, ge=0)
    caption_tag_dropout_rate: float | None = None
    token_warmup_min: StrictInt | None = Field(default=None, ge=0)
    token_warmup_step: float | None = None
    # misc (kohya names; see dataset.py / metadata.py)
    resize_interpolation: StrictStr | None = None
    custom_attributes: dict[str, Any] | None = None
    cache_info: StrictBool | None = None
    # augmentation
    flip_aug: StrictBool | None = None
    random_crop: StrictBool | None = None
    color_aug: StrictBool | None = None

    @field_validator("num_repeats")
    @classmethod
    def _num_repeats(cls, v: int | None) -> int | None:
        if v is not None and v > MAX_NUM_REPEATS:
            raise ValueError(f"{v} is above the limit of {MAX_NUM_REPEATS}; an epoch is every image × its "
                             "repeats, so train longer with max_train_steps / max_train_epochs instead")
        return v

    @field_validator("caption_dropout_rate", "caption_tag_dropout_rate", mode="before")
    @classmethod
    def _rate(cls, v: Any) -> Any:
        if v is None:
            return None
        v = _as_number(v)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"must be a probability between 0 and 1, got {v:g}")
        return v

    @field_validator("token_warmup_step", mode="before")
    @classmethod
    def _warmup_step(cls, v: Any) -> Any:
        if v is None:
            return None
        v = _as_number(v)
        if v < 0:
            raise ValueError(f"must be >= 0 (a step count, or a fraction of max_train_steps when < 1), got {v:g}")
        return v

    @field_validator("caption_separator")
    @classmethod
    def _separator(cls, v: str | None) -> str | None:
        if v is not None and v == "":
            raise ValueError('must not be empty (kohya\'s default is ",")')
        return v

    @field_validator("resize_interpolation")
    @classmethod
    def _interpolation(cls, v: str | None) -> str | None:
        if v is not None and v.lower() not in RESIZE_INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {v!r}; kohya's names: {', '.join(RESIZE_INTERPOLATIONS)}")
        return v.lower() if v is not None else None


class _DatasetLevel(_Ascendable):
    resolution: tuple[StrictInt, StrictInt] | None = None  # (width, height); an int n means (n, n)
    batch_size: StrictInt | None = Field(default=None, ge=1)
    enable_bucket: StrictBool | None = None
    min_bucket_reso: StrictInt | None = Field(default=None, ge=1)
    max_bucket_reso: StrictInt | None = Field(default=None, ge=1)
    bucket_reso_steps: StrictInt | None = Field(default=None, ge=1)
    bucket_no_upscale: StrictBool | None = None
    bucket_free_fit: StrictBool | None = None  # beautifulrem/sd-scripts fork key
    validation_split: float | None = None
    validation_seed: StrictInt | None = None
    skip_image_resolution: tuple[StrictInt, StrictInt] | None = None  # an int n means (n, n)

    @field_validator("validation_split", mode="before")
    @classmethod
    def _validation_split(cls, v: Any) -> Any:
        if v is None:
            return None
        v = _as_number(v)
        if not 0.0 <= v < 1.0:
            raise ValueError(f"must be a fraction in [0, 1) (0.1 = hold out 10% of each subset), got {v:g}")
        return v

    @field_validator("resolution", "skip_image_resolution", mode="before")
    @classmethod
    def _resolution(cls, v: Any, info: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, bool):
            raise ValueError("expected an int or [width, height]")  # noqa: TRY004 - pydantic wants ValueError
        if isinstance(v, int):
            v = (v, v)
        if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in v
        ):
            raise ValueError(f"expected an int or [width, height] of ints, got {v!r}")
        if min(v) < 1:
            raise ValueError(f"must be positive, got {list(v)}")
        if info.field_name == "resolution" and max(v) > MAX_RESOLUTION_SIDE:
            raise ValueError(f"{list(v)} has a side above the limit of {MAX_RESOLUTION_SIDE} px; use at most "
                             f"{MAX_RESOLUTION_SIDE} (Anima's native size is 1024)")
        return tuple(v)

    @field_validator("min_bucket_reso", "max_bucket_reso")
    @classmethod
    def _bucket_side(cls, v: int | None) -> int | None:
        if v is not None and v > MAX_BUCKET_SIDE:
            raise ValueError(f"{v} is above the limit of {MAX_BUCKET_SIDE} px; use at most {MAX_BUCKET_SIDE} "
                             "(2 × resolution is usual)")
        return v

    @field_validator("bucket_reso_steps")
    @classmethod
    def _steps(cls, v: int | None) -> int | None:
        if v is not None and v % ANIMA_PIXEL_MULTIPLE:
            raise ValueError(
                f"must be a multiple of {ANIMA_PIXEL_MULTIPLE} for Anima (DiT patch 2 x VAE 8), got {v}; "
                f"try {max(ANIMA_PIXEL_MULTIPLE, v - v % ANIMA_PIXEL_MULTIPLE)} or 64"
            )
        return v


class SubsetConfig(_Ascendable):
    image_dir: StrictStr | None = None  # required unless metadata_file is set (checked in _check_keys)
    metadata_file: StrictStr | None = None
    is_reg: StrictBool | None = None
    alpha_mask: StrictBool | None = None
    conditioning_data_dir: StrictStr | None = None  # mask images for masked_loss (same file stems)


class GeneralConfig(_DatasetLevel):
    pass


class DatasetSection(_DatasetLevel):
    subsets: list[SubsetConfig]


class DatasetConfig(_Strict):
    general: GeneralConfig = GeneralConfig()
    datasets: list[DatasetSection]
    # folder of the TOML file (relative image_dir fallback); None for configs built from a dict
    source_dir: Path | None = None


# --- key checks -------------------------------------------------------------------------------------------

def _closest(key: str, names: set[str] | frozenset[str]) -> str:
    match = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
    if match:
        return f"; did you mean '{match[0]}'?"
    return f"; valid options here: {', '.join(sorted(names))}"


def _check_table(table: dict, where: str, allowed: frozenset[str], level: str) -> None:
    if not isinstance(table, dict):
        raise DatasetConfigError(f"{where} must be a table, got {type(table).__name__}")
    for key in list(table):
        if key in allowed:
            continue
        if key == "network_multiplier" and table[key] in (1, 1.0) and not isinstance(table[key], bool):
            del table[key]  # kohya's default strength: what anima-trainer does anyway
            continue
        if key in UNSUPPORTED_KEYS:
            raise DatasetConfigError(
                f"dataset option '{key}' is not supported (found in {where}): {UNSUPPORTED_KEYS[key]}"
            )
        if level == "subset" and key in DATASET_KEYS:
            raise DatasetConfigError(
                f"'{key}' in {where} is a dataset-level option; set it in [[datasets]] or [general] instead"
            )
        if level != "subset" and key in SUBSET_ONLY_KEYS:
            raise DatasetConfigError(f"'{key}' in {where} can only be set inside [[datasets.subsets]]")
        raise DatasetConfigError(f"unknown dataset option '{key}' in {where}" + _closest(key, allowed))


def _check_keys(raw: dict) -> None:
    top = frozenset({"general", "datasets"})
    for key in raw:
        if key not in top:
            raise DatasetConfigError(f"unknown top-level table '{key}' in the dataset config" + _closest(key, top))
    _check_table(raw.get("general", {}), GENERAL_TABLE, DATASET_KEYS | ASCENDABLE_KEYS, "general")
    datasets = raw.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise DatasetConfigError("the dataset config has no [[datasets]]; add at least one with a [[datasets.subsets]]")
    for i, ds in enumerate(datasets):
        _check_table(ds, dataset_table(i), DATASET_KEYS | ASCENDABLE_KEYS | {"subsets"}, "dataset")
        subsets = ds.get("subsets")
        if not isinstance(subsets, list) or not subsets:
            raise DatasetConfigError(f"{dataset_table(i)} has no [[datasets.subsets]]; add one with image_dir")
        for j, sub in enumerate(subsets):
            _check_table(sub, subset_table(i, j), ASCENDABLE_KEYS | SUBSET_ONLY_KEYS, "subset")
            if "image_dir" not in sub and "metadata_file" not in sub:
                raise DatasetConfigError(
                    f"{subset_table(i, j)} has no image_dir (required; a fine-tuning subset sets metadata_file)"
                )
            stray = sorted(DREAMBOOTH_ONLY_KEYS & set(sub)) if "metadata_file" in sub else []
            if stray:
                raise DatasetConfigError(
                    f"'{stray[0]}' in {subset_table(i, j)} has no effect with metadata_file (captions come from "
                    f"the metadata); remove it"
                )
        styles = {"metadata_file" in sub for sub in subsets}
        if len(styles) > 1:
            raise DatasetConfigError(
                f"{dataset_table(i)} mixes subsets with and without metadata_file; as in kohya, put fine-tuning "
                f"(metadata_file) and DreamBooth (image_dir + caption files) subsets in separate [[datasets]]"
            )


def _where(loc: tuple) -> tuple[str, str]:
    """pydantic error location -> (key, table)."""
    loc = tuple(loc)
    if loc and loc[0] == "general":
        return str(loc[1]) if len(loc) > 1 else "general", GENERAL_TABLE
    if len(loc) >= 5 and loc[0] == "datasets" and loc[2] == "subsets":
        return str(loc[4]), subset_table(int(loc[1]), int(loc[3]))
    if len(loc) >= 3 and loc[0] == "datasets":
        return str(loc[2]), dataset_table(int(loc[1]))
    return ".".join(map(str, loc)), "the dataset config"


def parse_dataset_config(raw: dict, source_dir: str | Path | None = None) -> DatasetConfig:
    """Validate an already-parsed TOML dict (used by `load_dataset_config` and by tests / other callers)."""
    if not isinstance(raw, dict):
        raise DatasetConfigError("the dataset config must be a table")
    _check_keys(raw)
    try:
        return DatasetConfig(**raw, source_dir=Path(source_dir) if source_dir is not None else None)
    except ValidationError as e:
        err = e.errors()[0]
        key, table = _where(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        suffix = "" if err["type"] == "value_error" else f" (got {type(got).__name__} {got!r})"
        raise DatasetConfigError(f"dataset option '{key}' in {table}: {msg}{suffix}") from None


def load_dataset_config(path: str | Path) -> DatasetConfig:
    """Read and validate a kohya-style dataset.toml."""
    path = Path(path)
    if path.suffix == "" and not path.exists() and path.with_suffix(".toml").exists():
        path = path.with_suffix(".toml")
    if not path.is_file():
        what = "is a folder, not a TOML file" if path.is_dir() else "is not a file" if path.exists() else \
            "does not exist"
        raise DatasetConfigError(f"dataset_config: {path} {what}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DatasetConfigError(f"dataset config {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise DatasetConfigError(f"dataset_config: {path} cannot be read: {e.strerror or e}") from None
    except RecursionError:  # tomllib recurses per nesting level
        raise DatasetConfigError(f"dataset_config: {path} is nested too deeply to be read (a broken or hostile "
                                 "TOML; dataset.toml files are a few tables deep)") from None
    try:
        return parse_dataset_config(raw, source_dir=path.resolve().parent)
    except DatasetConfigError as e:
        raise DatasetConfigError(f"{path}: {e}") from None
