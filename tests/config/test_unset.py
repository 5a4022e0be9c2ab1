"""kohya's "unset" as GUIs write it ("" and, per option, "None" or []) is one pass (config/unset.py) before the
fields are validated: the option keeps its default, also when a TrainConfig is built directly."""

from __future__ import annotations

import pytest

from anima_trainer.config import ConfigError, TrainConfig, make_train_config
from anima_trainer.config.unset import UNSET_RULE, drop_unset

PATHS = dict(pretrained_model_name_or_path="d", qwen3="q", vae="v", output_dir="o", dataset_config="ds")


def test_every_rule_names_a_setting():
    assert set(UNSET_RULE) <= set(TrainConfig.model_fields)


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("log_prefix", "", None), ("resume", "", None), ("save_precision", "", None), ("noise_offset", "", None),
    ("validation_seed", "", None), ("lr_scheduler_args", "", {}), ("base_weights", [], None),
    ("scale_weight_norms", "", None), ("attention_backend", "  ", "auto"), ("t5_tokenizer_subfolder", " ", "tokenizer"),
    ("compile_mode", "None", "default"), ("lr_scheduler_power", "None", 1.0), ("initial_step", " None ", None),
    ("text_encoder_lr", [], None), ("text_encoder_lr", "None", None), ("blocks_to_swap", None, 0),
    ("checkpoint_blocks", "", None),
])
def test_unset_spellings_keep_the_default(name, value, expected):
    assert getattr(make_train_config({**PATHS, name: value}), name) == expected


@pytest.mark.parametrize(("name", "value"), [("log_prefix", " "), ("noise_offset", "None"), ("resume", " ")])
def test_other_spellings_are_values(name, value):
    """Only the spellings each option accepted before: a blank free-text value is a value, "None" is no number."""
    try:
        got = getattr(make_train_config({**PATHS, name: value}), name)
    except ConfigError:
        return
    assert got == value


def test_required_path_given_as_empty_is_required():
    with pytest.raises(ConfigError, match=r"qwen3: required \(set --qwen3"):
        make_train_config({**PATHS, "qwen3": ""})


def test_drop_unset_leaves_other_values():
    assert drop_unset({"log_prefix": "", "network_dim": "", "x": ""}) == {"network_dim": "", "x": ""}
