"""Training settings: `TrainConfig` (kohya names and defaults) built from the command line and a kohya training
TOML by `parse_train_args`; every user mistake is a `ConfigError` naming the key or flag."""

from anima_trainer.config.errors import ConfigError
from anima_trainer.config.loader import (
           build_train_parser,
           parse_train_args,
           read_train_toml,
)
from anima_trainer.config.train import TrainConfig, make_train_config

__all__ = ["ConfigError", "TrainConfig", "build_train_parser", "make_train_config", "parse_train_args",
           "read_train_toml"]
