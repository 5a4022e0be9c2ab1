"""TrainConfig's option groups live in their own modules as pydantic mixins (model_files, save_settings,
network_settings, optimisation_settings, speed_memory_settings, flow_settings, noise_settings, data_settings,
logging_settings, sampling_settings, text_encoder_settings, vae_settings, output_settings, sd_scripts_anima,
finetune_settings): the
public API of config/train.py is unchanged and the cross-field check still runs after the groups' own model
validators."""

from __future__ import annotations

import pytest

from anima_trainer.config import train
from anima_trainer.config.data_settings import CacheSettings, DatasetSettings
from anima_trainer.config.finetune_settings import FinetuneSettings
from anima_trainer.config.flow_settings import FlowSettings
from anima_trainer.config.logging_settings import LoggingSettings
from anima_trainer.config.model_files import ModelFileSettings
from anima_trainer.config.network_settings import NetworkModuleSettings, NetworkSettings
from anima_trainer.config.noise_settings import NoiseSettings
from anima_trainer.config.optimisation_settings import OptimisationSettings
from anima_trainer.config.output_settings import OutputSettings
from anima_trainer.config.sampling_settings import SamplingSettings
from anima_trainer.config.save_settings import SaveSettings
from anima_trainer.config.sd_scripts_anima import SdScriptsAnimaSettings
from anima_trainer.config.speed_memory_settings import SpeedMemorySettings
from anima_trainer.config.text_encoder_settings import TextEncoderSettings
from anima_trainer.config.train import TrainConfig, make_train_config
from anima_trainer.config.errors import ConfigError
from anima_trainer.config.vae_settings import VaeSettings

PATHS = dict(pretrained_model_name_or_path="d", qwen3="q", vae="v", output_dir="o", dataset_config="ds")
GROUPS = (ModelFileSettings, SaveSettings, NetworkModuleSettings, NetworkSettings, OptimisationSettings,
          SpeedMemorySettings, FlowSettings, NoiseSettings, DatasetSettings, CacheSettings, LoggingSettings,
          SamplingSettings, TextEncoderSettings, VaeSettings, OutputSettings, SdScriptsAnimaSettings,
          FinetuneSettings)


def test_each_group_is_a_mixin_of_train_config() -> None:
    for group in GROUPS:
        assert issubclass(TrainConfig, group)
        assert set(group.model_fields) <= set(TrainConfig.model_fields)
    # every field is declared in exactly one group: TrainConfig composes them and declares none itself
    declared = [name for group in GROUPS for name in group.__annotations__ if name in group.model_fields]
    assert sorted(declared) == sorted(TrainConfig.model_fields)
    assert TrainConfig.model_config["extra"] == "forbid"
    with pytest.raises(ConfigError, match="no_such_option: unknown setting"):
        make_train_config({**PATHS, "no_such_option": 1})


def test_names_importable_from_config_train() -> None:
    for name in ("TrainConfig", "make_train_config", "check_output_name", "MINIMUM_METADATA_KEYS",
                 "FILE_NAME_MAX_BYTES", "OUTPUT_NAME_MAX_BYTES", "SD_SCRIPTS_ANIMA_MODULES",
                 "SD_SCRIPTS_ANIMA_LOKR_FACTOR", "SD_SCRIPTS_ANIMA_NETWORK_ARGS", "SD_SCRIPTS_ANIMA_EMPTY",
                 "_Notices", "_data_url"):
        assert hasattr(train, name), name


def test_model_validators_run_groups_first_then_the_cross_field_check() -> None:
    after = [name for name, d in TrainConfig.__pydantic_decorators__.model_validators.items()
             if d.info.mode == "after"]
    assert after == ["_noise_options", "_compile_options_from_torch_compile", "_full_precision", "_cross_field"]


def test_torch_compile_is_mapped_before_the_memory_check() -> None:
    # the cross-field memory check sees compile_blocks set by torch_compile (selective checkpointing refuses it)
    with pytest.raises(ConfigError, match="checkpoint_mode: 'selective' does not work with compile_blocks"):
        make_train_config({**PATHS, "torch_compile": True, "gradient_checkpointing": True,
                           "checkpoint_mode": "selective"})


def test_group_checks_keep_their_messages() -> None:
    with pytest.raises(ConfigError, match="adaptive_noise_scale: needs noise_offset"):
        make_train_config({**PATHS, "adaptive_noise_scale": 0.1})
    with pytest.raises(ConfigError, match="full_bf16 requires mixed_precision"):
        make_train_config({**PATHS, "full_bf16": True})
    c = make_train_config({**PATHS, "network_module": "networks.lokr_anima"})
    assert c.sd_scripts_anima_defaults and c.gradient_checkpointing and c.network_args["factor"] == "8"
    assert c.sd_scripts_anima_notices()[0].startswith("sd-scripts-anima defaults")
