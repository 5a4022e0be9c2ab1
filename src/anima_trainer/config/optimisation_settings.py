"""Optimisation options of `TrainConfig`: learning rates, the optimizer, the learning-rate schedule, the length of
the run, batch, precision and seed (kohya's names and defaults), and the EMA of the trained weights (ours).  The
rules between optimizer and schedule are config/optimizer_rules.py and config/schedule_rules.py; the optimizer name
is resolved by TrainConfig."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from anima_trainer.config import kohya_options as ko
from anima_trainer.config.errors import did_you_mean
from anima_trainer.config.rules import kv_pairs


class OptimisationSettings(BaseModel):
    """Fields, value parsing (kohya's int_or_float, key=value lists) and the warm-up check of the optimisation
    and schedule options (a mixin of TrainConfig)."""

    # optimisation
    # upper bounds: a rate beyond them is a typo (1e39 overflows float32 inside the optimizer); Prodigy and
    # D-Adaptation use about 1
    learning_rate: float = Field(2e-6, gt=0, le=1000, description="base learning rate (kohya default 2e-6)")
    unet_lr: float | None = Field(None, gt=0, le=1000,
                                  description="learning rate of the DiT LoRA (default: learning_rate)")
    optimizer_type: str = Field("AdamW", description="kohya name (AdamW, AdamW8bit, Lion, Prodigy, AdaFactor, "
                                                     "RAdamScheduleFree, ...), a torch.optim or pytorch_optimizer "
                                                     "class, or module.Class")
    optimizer_args: dict[str, Any] = Field(default_factory=dict, description="key=value ... for the optimizer")
    use_8bit_adam: bool = Field(False, description="kohya's legacy flag: optimizer_type AdamW8bit")
    use_lion_optimizer: bool = Field(False, description="kohya's legacy flag: optimizer_type Lion")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
                          "piecewise_constant", "adafactor"] = Field(
        "constant", description="learning-rate schedule (docs/training.md, Learning-rate schedules)")
    lr_warmup_steps: int | float = Field(0, description="warm-up steps, or a fraction < 1 of all steps")
    lr_decay_steps: int | float = Field(0, description="warmup_stable_decay: decay steps, or a fraction < 1")
    lr_scheduler_num_cycles: float = Field(1.0, gt=0, description="kohya's meaning: restarts of "
                                           "cosine_with_restarts; 2 x the cosine periods of cosine_with_min_lr and "
                                           "warmup_stable_decay (1 = one descent); not used by cosine (one descent). "
                                           "sd-scripts-anima configs: cosine periods (0.5 = one descent)")
    lr_scheduler_power: float = Field(1.0, gt=0, description="polynomial: exponent of the decay")
    lr_scheduler_min_lr_ratio: float = Field(0.0, ge=0, le=1, description="end lr / lr (cosine_with_min_lr, "
                                                                          "warmup_stable_decay, polynomial)")
    lr_scheduler_timescale: int | None = Field(None, ge=1, description="inverse_sqrt (default: warm-up steps, "
                                                                       "else 10000)")
    lr_scheduler_type: str | None = Field(None, description="a torch.optim.lr_scheduler class or module.Class "
                                                            "(replaces lr_scheduler)")
    lr_scheduler_args: dict[str, Any] = Field(default_factory=dict, description="key=value ... for "
                                              "lr_scheduler_type, or step_rules for piecewise_constant")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0 = off)")
    # bounded so that step and epoch counters fit every index type (2**63-1 overflowed at the first batch):
    # 100 million steps is years of training
    max_train_steps: int = Field(1600, ge=1, le=100_000_000, description="optimizer steps to train (unless "
        "max_train_epochs is set)")
    max_train_epochs: int | None = Field(None, ge=1, le=1_000_000, description="overrides max_train_steps")
    train_batch_size: int = Field(1, ge=1, description="images per batch, for datasets whose dataset.toml sets no "
        "batch_size")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="dtype of the frozen models and the "
        "compute (no = fp32); adapters stay fp32")
    seed: int | None = Field(None, ge=0, lt=2**32, description="seed of data order, noise and σ (unset: 42)")
    # EMA of the trained weights (train/ema.py; not a kohya option: ai-toolkit's name)
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an exponential moving average (EMA) of the "
                                    "trained weights (the network's, or a fine-tune's DiT parameters) with this "
                                    "decay (e.g. 0.999), saved next to every network or DiT file as "
                                    "<name>-ema.safetensors and kept in training states (unset: off)")
    ema_warmup: bool = Field(True, description="warm the EMA decay up: min(ema_decay, (1 + t) / (10 + t)) at update "
                             "t, so the starting weights fade quickly (false: ema_decay from the second update)")
    ema_device: Literal["auto", "cpu", "device"] = Field(
        "auto", description="where the EMA's fp32 copy lives and is updated: \"device\" (beside the trained "
        "weights), \"cpu\" (host memory, pinned with CUDA: saves 4 bytes per trained parameter on the card), "
        "\"auto\" (a fine-tune's EMA on the host when it exceeds a quarter of the card's memory, else the device; "
        "LoRA: the device)")

    @field_validator("lr_scheduler", mode="before")
    @classmethod
    def _lr_scheduler(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ko.KOHYA_SCHEDULERS:
            raise ValueError(f"unknown scheduler {v!r}{did_you_mean(v, ko.KOHYA_SCHEDULERS)}; "
                             f"accepted: {', '.join(ko.KOHYA_SCHEDULERS)}")
        return v

    @field_validator("lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler_min_lr_ratio",
                     "lr_scheduler_timescale", "lr_scheduler_type", mode="before")
    @classmethod
    def _scheduler_number(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().endswith("%"):  # kohya's int_or_float: "50%" → 0.5
            try:
                return float(v.strip()[:-1]) / 100
            except ValueError:
                raise ValueError(f"expected a number, got {v!r}") from None
        return v

    @field_validator("lr_warmup_steps", "lr_decay_steps", mode="before")
    @classmethod
    def _lr_warmup_steps(cls, v: Any) -> Any:
        # kohya's int_or_float: "100" → 100, "0.1" → 0.1, "10%" → 0.1; a float < 1 is a fraction of all steps
        if isinstance(v, str):
            s = v.strip()
            try:
                v = float(s[:-1]) / 100 if s.endswith("%") else (int(s) if s.lstrip("+-").isdigit() else float(s))
            except ValueError:
                raise ValueError(f"expected an integer or a fraction < 1, got {s!r}") from None
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"expected an integer or a fraction < 1, got {v!r}")  # noqa: TRY004 (pydantic)
        if isinstance(v, float) and v >= 1:
            if not v.is_integer():
                raise ValueError(f"a float must be a fraction < 1 of all steps, got {v}")
            v = int(v)
        if v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @field_validator("optimizer_args", mode="before")
    @classmethod
    def _optimizer_args(cls, v: Any) -> Any:
        args = kv_pairs(v, "optimizer_args", literal=True)
        if isinstance(args, dict) and "lr" in args:
            raise ValueError("'lr' cannot be set here; use learning_rate")
        return args  # the keys are checked against the optimizer at start-up (train/optim.py)

    @field_validator("lr_scheduler_args", mode="before")
    @classmethod
    def _lr_scheduler_args(cls, v: Any) -> Any:
        return kv_pairs(v, "lr_scheduler_args", literal=True)

    def _check_ema_device(self) -> None:
        """ema_device places the EMA: without ema_decay there is none to place."""
        if self.ema_device != "auto" and self.ema_decay is None:
            raise ValueError(f"ema_device = \"{self.ema_device}\": places the EMA of the weights, but ema_decay is "
                             "unset (the EMA is off); set ema_decay (e.g. 0.999) or remove ema_device")

    def _check_constant_warmup(self) -> None:
        """kohya refuses a warm-up of the 'constant' schedule (it has none)."""
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            raise ValueError("lr_warmup_steps: the 'constant' scheduler has no warm-up; use lr_scheduler = "
                             "\"constant_with_warmup\" or lr_warmup_steps = 0")
