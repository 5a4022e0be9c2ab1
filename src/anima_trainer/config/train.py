"""`TrainConfig`: every training setting, with kohya's names and (where kohya has one) kohya's defaults.

The settings are declared by concept in option-group mixins (model_files, save_settings, network_settings,
optimisation_settings, speed_memory_settings, flow_settings, noise_settings, data_settings, logging_settings,
sampling_settings, text_encoder_settings, vae_settings, output_settings, sd_scripts_anima); this module composes
them, normalises paths, resolves the optimizer name and runs the cross-field check.  Values are type-checked by
pydantic; `anima_trainer.config.loader.parse_train_args` builds one from the command line and a `--config_file`
TOML.  Paths are kept as given (only `~` is expanded): a relative path, also one from a TOML, is relative to the
current working directory, as in kohya.  An empty string for a path means "not set".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from anima_trainer.config.data_settings import CacheSettings, DatasetSettings
from anima_trainer.config.errors import ConfigError
from anima_trainer.config.finetune_settings import FinetuneSettings
from anima_trainer.config.flow_settings import FlowSettings
from anima_trainer.config.logging_settings import LoggingSettings
from anima_trainer.config.model_files import ModelFileSettings
from anima_trainer.config.network_settings import NetworkModuleSettings, NetworkSettings
from anima_trainer.config.noise_settings import NoiseSettings
from anima_trainer.config.optimisation_settings import OptimisationSettings
from anima_trainer.config.optimizer_rules import check_optimizer_schedule, optimizer_name
from anima_trainer.config.output_settings import (
    MINIMUM_METADATA_KEYS,
    OutputSettings,
    _data_url,
)
from anima_trainer.config.sampling_settings import SamplingSettings
from anima_trainer.config.save_settings import (
    FILE_NAME_MAX_BYTES,
    OUTPUT_NAME_MAX_BYTES,
    SaveSettings,
    check_output_name,
)
from anima_trainer.config.sd_scripts_anima import (
    SD_SCRIPTS_ANIMA_EMPTY,
    SD_SCRIPTS_ANIMA_LOKR_FACTOR,
    SD_SCRIPTS_ANIMA_MODULES,
    SD_SCRIPTS_ANIMA_NETWORK_ARGS,
    SdScriptsAnimaSettings,
    _Notices,
)
from anima_trainer.config.speed_memory_settings import SpeedMemorySettings
from anima_trainer.config.text_encoder_settings import TextEncoderSettings
from anima_trainer.config.unset import drop_unset
from anima_trainer.config.vae_settings import VaeSettings

# re-exported: importable from here as before the option groups moved to their own modules
__all__ = ["FILE_NAME_MAX_BYTES", "MINIMUM_METADATA_KEYS", "OUTPUT_NAME_MAX_BYTES", "SD_SCRIPTS_ANIMA_EMPTY",
           "SD_SCRIPTS_ANIMA_LOKR_FACTOR", "SD_SCRIPTS_ANIMA_MODULES", "SD_SCRIPTS_ANIMA_NETWORK_ARGS", "TrainConfig",
           "check_output_name", "make_train_config", "_Notices", "_data_url"]


# pydantic collects the fields of the bases from the last one to the first, then its own: listed in reverse, so that
# the fields (and `--help`, output_config files and the order of error messages) read model files, saving, network,
# optimisation, speed and memory, flow matching, dataset, logging, sampling and caches after the older groups
class TrainConfig(CacheSettings, SamplingSettings, LoggingSettings, DatasetSettings, FlowSettings,
                  SpeedMemorySettings, OptimisationSettings, FinetuneSettings, NetworkModuleSettings, SaveSettings,
                  ModelFileSettings, NetworkSettings, TextEncoderSettings, VaeSettings, NoiseSettings,
                  SdScriptsAnimaSettings, OutputSettings, BaseModel):
    """Every training setting.  The option groups are mixins with their fields, validators and methods (module
    docstring); the cross-field check below runs after their model validators, in a fixed order."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=False)
    # where the settings came from (config/loader.py ConfigOrigin, set by parse_train_args; None otherwise): errors
    # found after validation, at the run's start-up, name the user's file and line as parse-time errors do
    _origin: Any = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _kohya_unset(cls, data: Any) -> Any:
        return drop_unset(data)  # "" (and per option "None", []) = not given: config/unset.py

    # --- normalisation (runs also when a TrainConfig is built directly) ----------------------------------------
    @field_validator("pretrained_model_name_or_path", "qwen3", "vae", "llm_adapter_path", "qwen3_tokenizer_path",
                     "t5_tokenizer_path", "output_dir", "network_weights", "dataset_config", "logging_dir",
                     "sample_prompts", "preservation_prompts", "eval_prompts", "log_tracker_config",
                     "tensorboard_logdir", "console_log_file", "tokenizer_cache_dir", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        if isinstance(v, str):
            return Path(v).expanduser()
        return v.expanduser() if isinstance(v, Path) else v

    @field_validator("optimizer_type", mode="before")
    @classmethod
    def _optimizer_type(cls, v: Any) -> Any:
        # kohya's spelling of its names; the class is resolved at start-up (train/optim.py check_optimization)
        return optimizer_name(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _cross_field(self) -> TrainConfig:
        self._sd_scripts_anima()
        self._check_text_encoder()  # after sd-scripts-anima's defaults (its DiT-only default)
        self._check_preservation()  # after them too: it reads trains_text_encoder
        check_optimizer_schedule(self)
        self._check_memory_options()
        self._check_constant_warmup()
        self._check_network_module()
        self._check_save_format()
        self._check_logging()
        self._check_sample_use_ema()
        self._check_ema_device()
        self._check_finetune()
        return self


_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string", "path": "a path",
    "dict": "a table", "list": "a list",
}


def _error_line(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "config"
    typ, ctx, inp = err["type"], err.get("ctx") or {}, err.get("input")
    if typ == "missing" or (inp is None and typ.endswith("_type")):
        return f"{loc}: required (set --{loc} or {loc} in the --config_file TOML)"
    if typ == "extra_forbidden":
        return f"{loc}: unknown setting"
    if typ == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        return msg if not err["loc"] or msg.startswith(f"{loc}:") else f"{loc}: {msg}"
    if typ == "literal_error":
        return f"{loc}: expected one of {ctx.get('expected')}, got {inp!r}"
    if typ in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[typ]
        bound = next(iter(ctx.values()))
        return f"{loc}: must be {op} {bound}, got {inp!r}"
    if typ == "int_from_float":
        return f"{loc}: expected an integer, got {inp!r}"
    if typ == "finite_number":
        return f"{loc}: expected a finite number, got {inp!r}"
    for word, text in _TYPE_WORDS.items():
        if typ.startswith(word + "_"):
            return f"{loc}: expected {text}, got {inp!r}"
    return f"{loc}: {err['msg']}"


def make_train_config(values: dict[str, Any]) -> TrainConfig:
    """Validate `values` (canonical names) into a TrainConfig; any problem → ConfigError naming the keys."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as e:
        # a union (e.g. `int | None`) reports one error per member: keep the first per field
        seen: dict[str, str] = {}
        for err in e.errors():
            seen.setdefault(".".join(str(p) for p in err["loc"][:1]), _error_line(err))
        raise ConfigError("\n".join(seen.values())) from None
