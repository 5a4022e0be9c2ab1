"""Sampling and validation options of `TrainConfig`: preview images (train/loop.py, sample/), the validation
loss on held-out images (train/validation.py) and the light evaluation metrics during the run
(train/measurements.py)."""

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
    # the light metrics during the run (train/measurements.py, evaluation/probe.py; docs/evaluation.md)
    eval_every_n_steps: int | None = Field(None, ge=1, description="light evaluation metrics (held-out loss when "
        "images are held out, preservation drift, trigger response, leak score) every N optimizer steps")
    eval_every_n_epochs: int | None = Field(None, ge=1, description="light evaluation metrics at the end of every "
                                            "N-th epoch")
    eval_prompts: Path | None = Field(None, description="prompt file (kohya prompt syntax) of the evaluation's "
        "probe prompts, checked at start-up; unset = the built-in prompt bank")
    eval_trigger: str | None = Field(None, description="trigger word of the evaluation's trigger response and leak "
        "score (unset: metadata_trigger_phrase; neither: only preservation drift over every prompt)")

    @property
    def evaluates(self) -> bool:
        """Whether the run logs the light metrics (eval_every_n_steps or eval_every_n_epochs)."""
        return bool(self.eval_every_n_steps or self.eval_every_n_epochs)

    def resolved_eval_trigger(self) -> str | None:
        """The evaluation's trigger: eval_trigger, else metadata_trigger_phrase, else None (blank counts as unset)."""
        for value in (self.eval_trigger, getattr(self, "metadata_trigger_phrase", None)):
            if value is not None and value.strip():
                return value.strip()
        return None

    def evaluation_notices(self) -> list[str]:
        """Start-up notices of the evaluation options: given without a schedule they do nothing; without a
        trigger only the drift is measured; with a trained text encoder the probe measures the DiT part."""
        if not self.evaluates:
            return [f"{k} = {getattr(self, k)}: no effect without eval_every_n_steps or eval_every_n_epochs"
                    for k in ("eval_prompts", "eval_trigger") if getattr(self, k) is not None]
        out = []
        if self.resolved_eval_trigger() is None:
            out.append("eval_every_n_*: no eval_trigger and no metadata_trigger_phrase, so only preservation drift "
                       "over every probe prompt is logged (no trigger response, no leak score); set eval_trigger to "
                       "the word the captions use for the concept")
        if getattr(self, "trains_text_encoder", False):
            out.append("eval_every_n_*: this run trains the text encoder, but the probe prompts are encoded once by "
                       "the base text encoder, so preservation drift and trigger response measure the DiT part of "
                       "the network (the held-out loss uses the trained encoder)")
        return out

    def _check_sample_use_ema(self) -> None:
        """Previews from the EMA need one (TrainConfig's cross-field check)."""
        if self.sample_use_ema and getattr(self, "ema_decay", None) is None:
            raise ValueError("sample_use_ema: previews from the EMA weights need ema_decay (the EMA is off); set "
                             "ema_decay (e.g. 0.999) or remove sample_use_ema")
