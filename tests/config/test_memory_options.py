"""Memory options in TrainConfig: kohya names (blocks_to_swap, cpu/unsloth offload, fp8_base[_unet], fp8_scaled),
their cross-checks, and `memory_options()` = the keyword arguments of models.block_runner.setup_memory."""

from __future__ import annotations

import inspect

import pytest

from anima_trainer.config import parse_train_args
from anima_trainer.models.block_runner import setup_memory
from anima_trainer.train.memory_estimate import estimate_training_memory
from tests.config.test_train_config import REQUIRED, error, write


def test_defaults_change_nothing():
    opts = parse_train_args(REQUIRED).memory_options()
    assert opts == {"gradient_checkpointing": False, "checkpoint_blocks": None, "checkpoint_mode": "full",
                    "cpu_offload_checkpointing": False, "blocks_to_swap": 0, "fp8_base": False,
                    "fp8_format": "e4m3fn"}
    params = set(inspect.signature(setup_memory).parameters)
    assert set(opts) <= params and set(opts) <= set(inspect.signature(estimate_training_memory).parameters)


def test_kohya_flags_on_the_command_line():
    c = parse_train_args([*REQUIRED, "--gradient_checkpointing", "--blocks_to_swap", "20",
                          "--unsloth_offload_checkpointing", "--fp8_base_unet", "--fp8_scaled",
                          "--checkpoint_mode", "selective", "--checkpoint_blocks", "12"])
    assert c.memory_options() == {"gradient_checkpointing": True, "checkpoint_blocks": 12,
                                  "checkpoint_mode": "selective", "cpu_offload_checkpointing": True,
                                  "blocks_to_swap": 20, "fp8_base": True, "fp8_format": "e4m3fn"}


def test_kohya_toml_values(tmp_path):
    toml = write(tmp_path, 'gradient_checkpointing = true\ncpu_offload_checkpointing = true\nblocks_to_swap = ""\n'
                           'fp8_base = true\nfp8_format = "e5m2"\nfp8_base_unet = false\nfp8_scaled = false\n')
    opts = parse_train_args([*REQUIRED, "--config_file", str(toml)]).memory_options()
    assert (opts["blocks_to_swap"], opts["cpu_offload_checkpointing"], opts["fp8_base"], opts["fp8_format"]) == (
        0, True, True, "e5m2")


def test_options_that_need_another_one():
    msg = error([*REQUIRED, "--cpu_offload_checkpointing", "--checkpoint_mode", "selective"])
    assert "cpu_offload_checkpointing, checkpoint_mode: needs gradient_checkpointing = true" in msg
    assert "checkpoint_blocks: needs gradient_checkpointing" in error([*REQUIRED, "--checkpoint_blocks", "3"])
    assert "fp8_scaled: needs fp8_base" in error([*REQUIRED, "--fp8_scaled"])
    assert "DoRA" in error([*REQUIRED, "--fp8_base", "--network_args", "dora_wd=true"])
    assert "blocks_to_swap" in error([*REQUIRED, "--blocks_to_swap", "-1"])
    assert "fp8_format" in error([*REQUIRED, "--fp8_format", "e4m3"])


def test_selective_checkpointing_with_compile_is_refused_at_start_up():
    from anima_trainer.config import ConfigError, make_train_config

    values = {"pretrained_model_name_or_path": "d.safetensors", "qwen3": "q.safetensors", "vae": "v.safetensors",
              "output_dir": "out", "dataset_config": "dataset.toml", "gradient_checkpointing": True,
              "checkpoint_mode": "selective", "compile_blocks": True}
    with pytest.raises(ConfigError, match=r"checkpoint_mode: 'selective' does not work with compile_blocks"):
        make_train_config(values)
    assert make_train_config({**values, "checkpoint_mode": "full"}).compile_blocks
