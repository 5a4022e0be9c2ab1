"""Sampling and validation options of `TrainConfig`: preview images (train/loop.py, sample/) and the validation
loss on held-out images (train/validation.py)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class SamplingSettings(BaseModel):
    """Fields of previews and validation (a mixin of TrainConfig; the loader's sample_notices say when previews
    have no prompt file)."""

    sample_every_n_steps: int | None = Field(None, ge=1, description="preview images every N optimizer steps (needs "
        "sample_prompts)")
    sample_every_n_epochs: int | None = Field(None, ge=1, description="preview images every N epochs (needs "
        "sample_prompts)")
    sample_prompts: Path | None = Field(None, description="kohya prompt file (.txt with --n --w --h --d --s --l "
                                        "--fs, .toml or .json), checked whole at start-up; sizes at most 4096 px")
    sample_at_first: bool = Field(False, description="also sample before the first step")
    sample_use_ema: bool = Field(False, description="draw the previews with the EMA weights (needs ema_decay); "
                                 "training goes on with its own weights")
    # validation loss on held-out images (train/validation.py); split/seed: defaults for dataset.toml
    validation_split: float = Field(0.0, ge=0, lt=1, description="fraction of each dataset's (non-reg) images held "
                                    "out for validation, where dataset_config does not set it")
    validation_seed: int | None = Field(None, ge=0, description="seed of the held-out choice and the validation "
                                        "noise, where dataset_config does not set it (default: seed)")
    validate_every_n_steps: int | None = Field(None, ge=1, description="validation loss every N optimizer steps")
    validate_every_n_epochs: int | None = Field(None, ge=1, description="validation loss every N epochs (default: "
                                                "every epoch when images are held out)")
    max_validation_steps: int | None = Field(None, ge=1, description="use at most N validation batches")

    def _check_sample_use_ema(self) -> None:
        """Previews from the EMA need one (TrainConfig's cross-field check)."""
        if self.sample_use_ema and getattr(self, "ema_decay", None) is None:
            raise ValueError("sample_use_ema: previews from the EMA weights need ema_decay (the EMA is off); set "
                             "ema_decay (e.g. 0.999) or remove sample_use_ema")
