"""Logging and monitoring options of `TrainConfig`: console, trackers, TensorBoard and the run's alerts
(train/monitor.py, train/events.py, train/tracking.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator


class LoggingSettings(BaseModel):
    """Fields, validators and the cross-checks of logging and monitoring (a mixin of TrainConfig)."""

    logging_dir: Path | None = Field(None, description="tracker folder (default with TensorBoard: <output_dir>/logs)")
    log_with: Literal["tensorboard", "wandb", "all", "none"] | None = Field(
        None, description="trackers (default: tensorboard when installed; none = off)")
    log_prefix: str | None = Field(None, description="run folder prefix (default: <output_name>_)")
    console_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] | None = Field(
        None, description="console log level (kohya's option; default INFO; DEBUG adds tracebacks to errors)")
    # monitoring / logging (train/monitor.py, events.py, tracking.py)
    log_every_n_steps: int = Field(1, ge=1, description="scalars every N optimizer steps (reads the loss then)")
    log_tracker_name: str | None = Field(None, description="tracker project name (default: network_train)")
    log_tracker_config: Path | None = Field(None, description="TOML of tracker init arguments ([wandb] ...)")
    wandb_run_name: str | None = Field(None, description="wandb run name (default: the run folder name)")
    wandb_api_key: str | None = Field(None, repr=False, description="wandb login key (never written to logs)")
    auto_start_tensorboard: bool = Field(False, description="serve the logs with TensorBoard during the run")
    tensorboard_host: str = Field("127.0.0.1", min_length=1, description="address the TensorBoard server binds to")
    tensorboard_port: int = Field(6006, ge=0, le=65535, description="first port tried (+20 more; 0 = any)")
    tensorboard_logdir: Path | None = Field(None, description="folder served (default: logging_dir)")
    monitor_memory: bool = Field(True, description="log CUDA memory (gpu/*) and check memory_warn_ratio")
    monitor_alert_policy: Literal["warn", "raise"] = Field("warn", description="raise: stop on memory_near_limit")
    nonfinite_loss_policy: Literal["warn", "raise", "skip_step"] | None = Field(
        None, description="NaN/Inf loss or grad norm (default: skip_step; raise when monitor_alert_policy = raise)")
    max_consecutive_nonfinite: int = Field(5, ge=1, description="skip_step: stop after N non-finite steps in a row")
    loss_spike_ratio: float = Field(3.0, gt=1, description="alert when loss > ratio × recent median (0 = default)")
    memory_warn_ratio: float = Field(0.95, gt=0, le=1, description="alert when peak allocated / card memory >= "
                                                                   "ratio (0 = default)")

    @field_validator("loss_spike_ratio", "memory_warn_ratio", mode="before")
    @classmethod
    def _zero_ratio_is_default(cls, v: Any, info: Any) -> Any:
        # sd-scripts-anima (anima_monitor_*_ratio): 0 means "use the default" (its `ratio or default`)
        try:
            zero = not isinstance(v, bool) and float(v) == 0
        except (TypeError, ValueError):
            return v
        return cls.model_fields[info.field_name].default if zero else v

    @field_validator("console_log_level", mode="before")
    @classmethod
    def _level_name(cls, v: Any) -> Any:
        return (v.strip().upper() or None) if isinstance(v, str) else v  # kohya's choices are upper case

    def _check_logging(self) -> None:
        """A tracker that needs a folder has one; the non-finite-loss policy follows the alert policy by default."""
        if self.log_with in ("tensorboard", "all") and self.logging_dir is None:
            raise ValueError(f"log_with: '{self.log_with}' needs logging_dir")
        if self.nonfinite_loss_policy is None:  # sd-scripts-anima's policy=raise also aborts on a non-finite loss
            self.nonfinite_loss_policy = "raise" if self.monitor_alert_policy == "raise" else "skip_step"
