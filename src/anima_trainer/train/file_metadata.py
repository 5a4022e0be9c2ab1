"""The metadata of every saved network file: kohya's `ss_*` keys, the `modelspec.*` block and `no_metadata`.

Why by hand: A1111/Forge (sd-webui-additional-networks), Civitai and kohya's own tools read these keys, so they
are written in kohya-ss/sd-scripts' formats (train_network.py's metadata dict and its `use_user_config` branch,
anima_train_network.py `update_metadata`, library/sai_model_spec.py): every value is `str(value)` (None → "None",
booleans "True"/"False"), structures are `json.dumps`'d.  The sshs_* hashes are added by the network save
(networks/hashes.py), so every file (step, epoch, final) has them.

Data keys (data/kohya_summary.py computes kohya's counts):
* `ss_datasets`: per [[datasets]] entry kohya's dict (is_dreambooth, batch_size_per_device, num_train_images,
  num_reg_images, resolution, enable_bucket, min/max_bucket_reso (None without buckets), tag_frequency,
  bucket_info, resize_interpolation, subsets: img_count, num_repeats, color_aug, flip_aug, random_crop,
  shuffle_caption, keep_tokens, keep_tokens_separator ("" when unset: kohya's argparse default),
  secondary_separator, enable_wildcard, caption_prefix, caption_suffix, resize_interpolation, image_dir
  (basename), class_tokens + is_reg, or metadata_file (basename)).  A dataset is "dreambooth" when none of its
  subsets has a metadata_file (kohya has one kind per dataset; we take each subset's own fields).  The
  dataset-level resize_interpolation is the subsets' common value, else None.
* `ss_tag_frequency`: {subset basename: {tag: count}}, the first dataset using a basename wins (kohya).
* `ss_dataset_dirs`: {basename: {"n_repeats", "img_count"}} of the non-reg subsets, a repeated basename as
  "name (2)", "name (3)" (kohya); `ss_reg_dataset_dirs`: the same for the regularisation subsets (kohya writes
  it only without dataset_config; here always).
* `ss_bucket_info`: kohya's {"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": e} —
  with one dataset exactly its `bucket_info` (null with enable_bucket off); with several, the buckets of all
  datasets merged by resolution (an anima-trainer extension: kohya writes this key only without dataset_config).
* With one dataset also the keys kohya writes without dataset_config: ss_batch_size_per_device (the dataset's),
  ss_total_batch_size, ss_resolution ("(w, h)"), ss_enable_bucket, ss_bucket_no_upscale, ss_min/max_bucket_reso,
  and ss_color_aug / ss_flip_aug / ss_random_crop / ss_shuffle_caption / ss_keep_tokens where its subsets agree.
* ss_caption_dropout_rate, ss_caption_dropout_every_n_epochs, ss_caption_tag_dropout_rate,
  ss_resize_interpolation (kohya: its command-line values): the value all subsets share, else kohya's default;
  ss_face_crop_aug_range: "None" (not supported here).
Paths: only basenames are written (model files, subset folders, metadata files), as kohya does; ss_sd_model_hash
/ ss_new_sd_model_hash and ss_vae_hash / ss_new_vae_hash are kohya's webui hashes of the base files ("IsADirectory"
for a folder, as kohya), computed once per file and run (at its first save; kohya hashes at start-up).
EMA files (`<name>-ema.safetensors`, train/ema.py) carry the same keys plus `ss_ema_decay`, `ss_ema_warmup` and
`ss_ema_updates` (optimizer steps averaged), which say that the file holds the EMA (`ema_metadata`; kept with
no_metadata too); the network file itself has none of them.
`no_metadata`: kohya keeps only its SS_METADATA_MINIMUM_KEYS of the ss_* keys, plus the modelspec block (and
the sshs_* hashes the save adds).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from anima_trainer.config import TrainConfig
from anima_trainer.config.train import MINIMUM_METADATA_KEYS
from anima_trainer.data import AnimaDataset
from anima_trainer.data.kohya_summary import bucket_info, dataset_summaries, subset_dir_name
from anima_trainer.train.optim import optimizer_description

_KOHYA_CAPTION_DEFAULTS = {"caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0,
                           "caption_tag_dropout_rate": 0.0}


@functools.lru_cache(maxsize=8)
def _webui_hashes(path: str, size: int, mtime_ns: int) -> tuple[str, str]:
    """(kohya's model_hash, calculate_sha256) of a file: the old webui hash (sha256 of 64 KiB at 1 MiB, 8 hex
    digits) and the full sha256."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
        f.seek(0)
        full = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            full.update(chunk)
    return legacy, full.hexdigest()


def model_file_keys(path: Path, name_key: str, hash_key: str, new_hash_key: str) -> dict[str, str]:
    """kohya's name and hashes of a base model file: the basename, and its webui hashes when it exists."""
    out = {}
    if path.exists():
        if path.is_dir():
            out[hash_key] = out[new_hash_key] = "IsADirectory"  # kohya's value for a folder
        else:
            st = path.stat()
            out[hash_key], out[new_hash_key] = _webui_hashes(str(path.resolve()), st.st_size, st.st_mtime_ns)
        out[name_key] = os.path.basename(os.path.normpath(str(path)))
    else:
        out[name_key] = str(path)  # kohya: a name that is not a file (e.g. a hub id) is written as given
    return out


def _common(values: list[Any], default: Any) -> Any:
    """The one value every subset has, else `default`."""
    return values[0] if values and all(v == values[0] for v in values) else default


def _unique_name(name: str, taken: dict) -> str:
    """kohya's de-duplication of subset basenames: "name", "name (2)", "name (3)", ..."""
    v, i = name, 2
    while v in taken:
        v, i = f"{name} ({i})", i + 1
    return v


def dataset_metadata(dataset: AnimaDataset, *, num_processes: int = 1,
                     gradient_accumulation_steps: int = 1) -> dict[str, Any]:
    """The data keys (module docstring), values not yet stringified."""
    summaries = dataset_summaries(dataset)
    datasets, tag_frequency, dirs, reg_dirs = [], {}, {}, {}
    all_subsets = []
    for d, (p, summary) in enumerate(zip(dataset.params, summaries)):
        used = [(p.subsets[s.index], s) for s in summary.subsets]
        all_subsets.extend(sub for sub, _ in used)
        dreambooth = not any(sub.metadata_file is not None for sub in p.subsets)
        entry: dict[str, Any] = {
            "is_dreambooth": dreambooth, "batch_size_per_device": p.batch_size,
            "num_train_images": summary.num_train_images, "num_reg_images": summary.num_reg_images,
            "resolution": list(p.resolution), "enable_bucket": bool(p.enable_bucket),
            "min_bucket_reso": p.min_bucket_reso if p.enable_bucket else None,
            "max_bucket_reso": p.max_bucket_reso if p.enable_bucket else None,
            "tag_frequency": summary.tag_frequency, "bucket_info": bucket_info(dataset, d),
            "resize_interpolation": _common([sub.resize_interpolation for sub, _ in used], None)}
        subsets = []
        for sub, s in used:
            c = sub.caption
            meta: dict[str, Any] = {
                "img_count": s.img_count, "num_repeats": sub.num_repeats, "color_aug": bool(sub.color_aug),
                "flip_aug": bool(sub.flip_aug), "random_crop": bool(sub.random_crop),
                "shuffle_caption": bool(c.shuffle_caption), "keep_tokens": c.keep_tokens,
                "keep_tokens_separator": c.keep_tokens_separator if c.keep_tokens_separator is not None else "",
                "secondary_separator": c.secondary_separator, "enable_wildcard": bool(c.enable_wildcard),
                "caption_prefix": c.caption_prefix, "caption_suffix": c.caption_suffix,
                "resize_interpolation": sub.resize_interpolation}
            if sub.image_dir is not None:
                meta["image_dir"] = Path(sub.image_dir).name
            if sub.metadata_file is None:
                meta["class_tokens"], meta["is_reg"] = sub.class_tokens, bool(sub.is_reg)
            else:
                meta["metadata_file"] = Path(sub.metadata_file).name
            subsets.append(meta)
            target = reg_dirs if sub.is_reg and sub.metadata_file is None else dirs
            target[_unique_name(subset_dir_name(sub), target)] = {"n_repeats": sub.num_repeats,
                                                                 "img_count": s.img_count}
        entry["subsets"] = subsets
        datasets.append(entry)
        for name, freq in summary.tag_frequency.items():
            tag_frequency.setdefault(name, freq)  # a folder used by two datasets counts once (kohya)
    out: dict[str, Any] = {
        "ss_datasets": json.dumps(datasets), "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_dataset_dirs": json.dumps(dirs), "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_num_train_images": sum(s.num_train_images for s in summaries),
        "ss_num_reg_images": sum(s.num_reg_images for s in summaries),
        "ss_num_validation_images": len(dataset.validation_items),
        "ss_bucket_free_fit": any(p.bucket_free_fit for p in dataset.params),
        "ss_face_crop_aug_range": None,
    }
    for key, default in _KOHYA_CAPTION_DEFAULTS.items():
        out[f"ss_{key}"] = _common([getattr(sub.caption, key) for sub in all_subsets], default)
    out["ss_resize_interpolation"] = _common([sub.resize_interpolation for sub in all_subsets], None)
    if len(dataset.params) == 1:
        p = dataset.params[0]
        out.update({
            "ss_bucket_info": json.dumps(bucket_info(dataset, 0)), "ss_batch_size_per_device": p.batch_size,
            "ss_total_batch_size": p.batch_size * num_processes * gradient_accumulation_steps,
            "ss_resolution": tuple(p.resolution), "ss_enable_bucket": bool(p.enable_bucket),
            "ss_bucket_no_upscale": bool(p.bucket_no_upscale),
            "ss_min_bucket_reso": p.min_bucket_reso if p.enable_bucket else None,
            "ss_max_bucket_reso": p.max_bucket_reso if p.enable_bucket else None})
        for key, get in (("color_aug", lambda s: bool(s.color_aug)), ("flip_aug", lambda s: bool(s.flip_aug)),
                         ("random_crop", lambda s: bool(s.random_crop)),
                         ("shuffle_caption", lambda s: bool(s.caption.shuffle_caption)),
                         ("keep_tokens", lambda s: s.caption.keep_tokens)):
            values = [get(sub) for sub in all_subsets]
            if values and all(v == values[0] for v in values):
                out[f"ss_{key}"] = values[0]
    else:
        out["ss_bucket_info"] = json.dumps(_merged_bucket_info(dataset))
    return out


def _merged_bucket_info(dataset: AnimaDataset) -> dict | None:
    """Several datasets: their bucketed items merged by resolution, in kohya's bucket_info shape."""
    infos = [bucket_info(dataset, d) for d in range(len(dataset.params))]
    if all(i is None for i in infos):
        return None
    counts: dict[tuple[int, int], int] = {}
    errors = [abs(it.bucket[0] / it.bucket[1] - it.size[0] / it.size[1]) for it in dataset.items
              if dataset.params[it.dataset_index].enable_bucket]
    for info in infos:
        for b in (info or {"buckets": {}})["buckets"].values():
            reso = tuple(b["resolution"])
            counts[reso] = counts.get(reso, 0) + b["count"]
    buckets = {i: {"resolution": list(r), "count": n} for i, (r, n) in enumerate(sorted(counts.items()))}
    return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0}


def _datasets_resolution(dataset: AnimaDataset) -> tuple[int, int] | None:
    resos = {tuple(p.resolution) for p in dataset.params}
    return resos.pop() if len(resos) == 1 else None


class RunMetadata:
    """Everything but the per-save keys is assembled once, at the start of the run (the base files are hashed at
    the first save, once); calling it with (step, epoch) gives a save's metadata, all strings."""

    def __init__(self, cfg: TrainConfig, dataset: AnimaDataset, *, max_steps: int, epochs: int, started: float,
                 batches_per_epoch: int | None = None, num_processes: int = 1) -> None:
        self.cfg = cfg
        self.resolution = _datasets_resolution(dataset)
        meta: dict[str, Any] = dict(cfg.to_metadata(optimizer_description(cfg.optimizer_type, cfg.optimizer_args)))
        meta.update(dataset_metadata(dataset, num_processes=num_processes,
                                     gradient_accumulation_steps=cfg.gradient_accumulation_steps))
        meta.update({
            "ss_session_id": secrets.randbelow(2**32 + 1),  # kohya: random.randint(0, 2**32), one per run
            "ss_training_started_at": started,
            "ss_num_batches_per_epoch": batches_per_epoch if batches_per_epoch is not None else len(dataset),
            "ss_num_epochs": epochs, "ss_max_train_steps": max_steps})
        self.meta = {k: str(v) for k, v in meta.items()}
        self._models_hashed = False

    def __call__(self, step: int, epoch: int) -> dict[str, str]:
        if not self._models_hashed:  # at the first save: a process that never saves never reads the base files
            self.meta.update(model_file_keys(Path(self.cfg.pretrained_model_name_or_path), "ss_sd_model_name",
                                             "ss_sd_model_hash", "ss_new_sd_model_hash"))
            self.meta.update(model_file_keys(Path(self.cfg.vae), "ss_vae_name", "ss_vae_hash", "ss_new_vae_hash"))
            self._models_hashed = True
        meta = dict(self.meta)
        meta.update({"ss_training_finished_at": str(time.time()), "ss_steps": str(step), "ss_epoch": str(epoch)})
        if self.cfg.no_metadata:  # kohya: only the minimum ss_* keys (+ modelspec, + the save's sshs_* hashes)
            meta = {k: meta[k] for k in MINIMUM_METADATA_KEYS if k in meta}
        meta.update(self.cfg.modelspec_metadata(time.time(), self.resolution))  # kohya dates each save
        return meta


def ema_metadata(decay: float, warmup: bool, updates: int) -> dict[str, str]:
    """The keys that mark an EMA network file (module doc), added to the save's own metadata."""
    return {"ss_ema_decay": str(decay), "ss_ema_warmup": str(warmup), "ss_ema_updates": str(updates)}
