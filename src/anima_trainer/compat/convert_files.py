"""Files of `anima-trainer convert-config`: read a root-style TOML, write the converted train.toml / dataset.toml
(and tracker.toml) atomically, and the command itself.  The mapping lives in convert_root.py."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from anima_trainer.compat.convert_root import (
    DATASET_NAME,
    STATUSES,
    TRACKER_NAME,
    TRAIN_NAME,
    Conversion,
    ConversionError,
    convert_root_config,
)
from anima_trainer.config.errors import ConfigError
from anima_trainer.config.tomlw import dumps
from anima_trainer.config.train import TrainConfig, make_train_config
from anima_trainer.data import parse_dataset_config
from anima_trainer.fileio import atomic_write_bytes, check_writable


def load_root_toml(path: str | Path) -> dict[str, Any]:
    import tomllib

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConversionError(f"{p}: not found")
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{p}: not valid TOML: {e}") from None


def check_file_name(name: str, flag: str) -> str:
    """A plain `.toml` file name for `--train_args_name` / `--dataset_name` (the files go into the output folder)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConversionError(f"{flag}: {name!r} is not a plain file name; choose the folder with --output_dir")
    if not name.endswith(".toml"):
        raise ConversionError(f"{flag}: {name!r} must end in .toml")
    return name


def write_conversion(conv: Conversion, source: str | Path, out_dir: str | Path, overwrite: bool = False,
                     train_name: str = TRAIN_NAME, dataset_name: str = DATASET_NAME,
                     check: Callable[[TrainConfig], object] | None = None) -> dict[str, Path]:
    """Validate the converted settings, then write train.toml (report as its comment header), dataset.toml and,
    for wandb init arguments, tracker.toml into `out_dir`; nothing is written when any file exists and
    `overwrite` is false, or when the result would not load or (`check`: the run's start-up check of optimizer
    and schedule, train/optim.py check_optimization) would not start."""
    out = Path(out_dir).expanduser()
    train_name = check_file_name(train_name, "--train_args_name")
    dataset_name = check_file_name(dataset_name, "--dataset_name")
    if train_name == dataset_name:
        raise ConversionError(f"--train_args_name and --dataset_name are both {train_name!r}; give two names")
    paths = {"train": out / train_name, "dataset": out / dataset_name}
    if conv.tracker:
        paths["tracker"] = out / TRACKER_NAME
        conv.train["log_tracker_config"] = str(paths["tracker"].absolute())
    for p in paths.values():
        check_writable(p, overwrite)
    conv.train["dataset_config"] = str(paths["dataset"].absolute())
    parse_dataset_config(conv.dataset, source_dir=out)
    try:
        cfg = make_train_config(dict(conv.train))
        if check is not None:  # the run's start-up check of optimizer and schedule (train/optim.py, via the CLI)
            check(cfg)
    except ConfigError as e:
        raise ConversionError(f"the converted settings do not validate (nothing written):\n{e}") from None
    header = (f"converted from {source} by `anima-trainer convert-config` on "
              f"{datetime.now().astimezone().isoformat(timespec='seconds')}\n"
              "paths are as written in the root config: relative ones are relative to the working directory\n\n"
              + conv.table())
    texts = {"train": dumps(conv.grouped_train(), header),
             "dataset": dumps(conv.dataset, f"dataset of {source} (converted by anima-trainer convert-config)")}
    if conv.tracker:
        texts["tracker"] = dumps(conv.tracker, "wandb.init arguments (log_tracker_config)")
    out.mkdir(parents=True, exist_ok=True)
    for name, p in paths.items():
        atomic_write_bytes(texts[name].encode("utf-8"), p)
    return paths


def convert_root_file(source: str | Path, out_dir: str | Path, overwrite: bool = False,
                      train_name: str = TRAIN_NAME, dataset_name: str = DATASET_NAME,
                      check: Callable[[TrainConfig], object] | None = None) -> tuple[Conversion, dict[str, Path]]:
    """Read, convert and write (see `write_conversion`)."""
    conv = convert_root_config(load_root_toml(source), out_dir)
    return conv, write_conversion(conv, source, out_dir, overwrite, train_name, dataset_name, check)


def run_convert_config(source: str | Path, out_dir: str | Path, overwrite: bool = False,
                       train_name: str = TRAIN_NAME, dataset_name: str = DATASET_NAME,
                       check: Callable[[TrainConfig], object] | None = None) -> int:
    """The `convert-config` command: convert, print the report table and the files written.  `train_name` /
    `dataset_name`: sd-scripts-anima's converter flags --train_args_name / --dataset_name."""
    conv, paths = convert_root_file(source, out_dir, overwrite, train_name, dataset_name, check)
    print(conv.table())
    counts = {s: sum(r.status == s for r in conv.rows) for s in STATUSES}
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    for p in paths.values():
        print(f"wrote {p}")
    print(f"train with: anima-trainer train --config_file {paths['train']}")
    return 0
