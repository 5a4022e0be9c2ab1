"""kohya's `--output_config`: the resolved training settings written to the `--config_file` path, then exit 0.

Why: users keep a long command line as a file to edit and rerun.  kohya writes the options that differ from
its parser defaults to the --config_file path (refusing an existing file) and stops without training; so do
we, after every option has been resolved and checked (a config that would not train is not written).  The
written file holds canonical names and loads back (`--config_file`) to the same TrainConfig.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic_core import PydanticUndefined

from anima_trainer.config.errors import ConfigError
from anima_trainer.config.tomlw import dumps
from anima_trainer.config.train import TrainConfig

log = logging.getLogger(__name__)

# never written: the switch itself, and a secret (kohya leaves out wandb_api_key too)
_LEFT_OUT = ("output_config", "wandb_api_key")


def config_path(config_file: str | Path) -> Path:
    """kohya's rule: '.toml' is appended when the name does not end with it."""
    p = Path(config_file).expanduser()
    return p if p.name.endswith(".toml") else p.with_name(p.name + ".toml")


def _toml_item(name: str, value: Any) -> Any:
    if isinstance(value, dict):  # network_args / optimizer_args / lr_scheduler_args: kohya's "key=value" lists
        literal = name != "network_args"  # the others are read back through ast.literal_eval
        return [f"{k}={v!r}" if literal and not isinstance(v, str) else f"{k}={v}" for k, v in value.items()]
    if isinstance(value, Path):
        return str(value)
    return value


def settings_to_write(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that differ from their defaults (required ones always), as TOML values."""
    out: dict[str, Any] = {}
    for name, info in TrainConfig.model_fields.items():
        if name in _LEFT_OUT:
            continue
        value = getattr(cfg, name)
        default = info.get_default(call_default_factory=True) if info.default is not PydanticUndefined or \
            info.default_factory is not None else PydanticUndefined
        if value is None or (default is not PydanticUndefined and value == default):
            continue
        out[name] = _toml_item(name, value)
    return out


def write_output_config(cfg: TrainConfig, config_file: str | Path) -> Path:
    """Write `cfg` to the --config_file path (never over an existing file); returns the path written."""
    from anima_trainer.fileio import (
        atomic_write_bytes,  # fileio loads torch (tensor files); config must not
    )

    path = config_path(config_file)
    if path.exists():
        raise ConfigError(f"output_config: {path} already exists; --output_config writes the settings to the "
                          "--config_file path and never replaces a file: name a new file")
    text = dumps(settings_to_write(cfg), comment="written by anima-trainer train --output_config (kohya's option)")
    atomic_write_bytes(text.encode("utf-8"), path, what="the config written by output_config")
    log.info("output_config: wrote the settings to %s; nothing was trained", path)
    return path
