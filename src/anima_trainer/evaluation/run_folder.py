"""What evaluation reads from a training run: its settings (the resolved `train_config.toml`, or the "config"
event of its event log) and its held-out images, rebuilt exactly as the run built them so that the held-out loss
of a saved network equals the run's `val/loss` at that step — and held-out images from a plain folder.

The run's validation split is rebuilt from its config the way `train` builds it (`data.build_run_dataset` with
the run seed, then `ValidationSet.from_dataset`) and measured with the run's settings (`HeldoutSettings.of_run`:
validation_seed, loss_type, huber_c, max_validation_steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from anima_trainer.config import ConfigError, TrainConfig, make_train_config, parse_train_args
from anima_trainer.config.run_files import EVENTS_SUFFIX, RESOLVED_CONFIG_NAME, read_events, run_seed
from anima_trainer.data import ValidationSet, build_dataset, build_run_dataset, parse_dataset_config
from anima_trainer.evaluation.heldout import HeldoutSettings


def load_run_config(path: str | Path) -> TrainConfig:
    """A run's settings from a training TOML (its resolved `train_config.toml`, or the user's own) or from a
    run's event log (`*.events.jsonl`: its newest "config" event)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--run_config: {path} is not a file (a train_config.toml or a run's .events.jsonl)")
    if path.name.endswith(EVENTS_SUFFIX):
        configs = [e["config"] for e in read_events(path) if e.get("type") == "config" and e.get("config")]
        if not configs:
            raise ConfigError(f"--run_config: {path} holds no \"config\" event (was the run started?)")
        return make_train_config({k: v for k, v in configs[-1].items() if v is not None})
    return parse_train_args(["--config_file", str(path)], prog="anima-trainer eval --run_config")


def find_run_config(run_folder: Path, event_log: Path | None) -> Path | None:
    """The file holding a run folder's settings: `<folder>/train_config.toml`, else its event log, else None."""
    toml = run_folder / RESOLVED_CONFIG_NAME
    if toml.is_file():
        return toml
    return event_log


@dataclass
class Heldout:
    """Held-out images for the held-out loss: the set, its settings and a description for results.json."""

    validation: ValidationSet
    settings: HeldoutSettings
    source: str  # "run" (a run's validation split) or "folder"
    where: str   # the run config or the folder

    def as_dict(self) -> dict:
        return {"source": self.source, "where": self.where, "images": len(self.validation.items),
                **self.settings.as_dict()}


def run_heldout(cfg: TrainConfig, where: str) -> Heldout | None:
    """The run's validation split as `train` built it, with the run's validation settings; None when the run
    holds nothing out (no validation_split)."""
    seed = run_seed(cfg)
    validation = ValidationSet.from_dataset(build_run_dataset(cfg, seed))
    if validation is None:
        return None
    return Heldout(validation, HeldoutSettings.of_run(cfg, seed), "run", where)


def folder_heldout(folder: str | Path, *, resolution: int, batch_size: int = 1, caption_extension: str = ".txt",
                   seed: int = 0, loss_type: str = "l2", huber_c: float = 0.1) -> Heldout:
    """Every image of `folder` (with its caption file) as held-out images: one dataset with aspect-ratio buckets
    around `resolution` (16 px steps), read without augmentation; item noise from `seed`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--heldout_images: {folder} is not a folder of images")
    raw = {"general": {"enable_bucket": True, "resolution": resolution, "min_bucket_reso": max(16, resolution // 4),
                       "max_bucket_reso": resolution * 2, "bucket_reso_steps": 16,
                       "caption_extension": caption_extension, "batch_size": batch_size},
           "datasets": [{"subsets": [{"image_dir": str(folder)}]}]}
    dataset = build_dataset(parse_dataset_config(raw), default_batch_size=batch_size, seed=seed)
    validation = ValidationSet(dataset.params, dataset.items, seed=seed)
    return Heldout(validation, HeldoutSettings(seed, loss_type, huber_c), "folder", str(folder))
