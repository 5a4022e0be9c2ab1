"""kohya options that are no TrainConfig field (issue 16 item 5): the switches of the alias table
(`fp8_base_unet`, `unsloth_offload_checkpointing`, kohya_options.SWITCHES) and the options of the rule table that
had a field doing nothing (`fp8_scaled`, `save_model_as`).  Each is loaded from a TOML, and the resulting setting,
the start-up notice and the error with file and line are asserted."""

from __future__ import annotations

from anima_trainer.compat.reference import render_reference
from anima_trainer.config import TrainConfig, build_train_parser, parse_train_args
from tests.config.test_train_config import REQUIRED, error, write

FP8_SCALED_TEXT = ("fp8 storage (fp8_base) is always scaled in anima-trainer: one fp32 scale per weight, kohya's "
                   "fp8_scaled; nothing to change")


def load(tmp_path, text: str, *cli: str) -> TrainConfig:
    return parse_train_args([*REQUIRED, "--config_file", str(write(tmp_path, text)), *cli])


def test_no_field_mirrors_another():
    gone = {"fp8_base_unet", "unsloth_offload_checkpointing", "fp8_scaled", "save_model_as"}
    assert not gone & set(TrainConfig.model_fields)


def test_fp8_base_unet_turns_on_fp8_base(tmp_path):
    c = load(tmp_path, "fp8_base_unet = true\n")
    assert (c.fp8_base, c.memory_options()["fp8_base"], c.notices) == (True, True, [])
    # kohya's metadata key: fp8 for the DiT alone, which is what fp8_base stores here
    assert c.fp8_base_unet is True and load(tmp_path, "fp8_base = true\n").fp8_base_unet is True
    assert load(tmp_path, "fp8_base_unet = false\n").fp8_base is False


def test_fp8_base_unet_never_conflicts_with_fp8_base(tmp_path):
    # kohya reads `fp8_base or fp8_base_unet`: a GUI's full TOML with one of them off is no conflict
    assert load(tmp_path, "fp8_base = false\nfp8_base_unet = true\n").fp8_base is True
    assert load(tmp_path, "fp8_base = true\nfp8_base_unet = false\n").fp8_base is True
    # each name keeps its own precedence: the command line's --no-fp8_base leaves the TOML's fp8_base_unet on
    assert load(tmp_path, "fp8_base_unet = true\n", "--no-fp8_base").fp8_base is True
    assert load(tmp_path, "fp8_base_unet = true\n", "--fp8_base_unet=false").fp8_base is False


def test_a_switch_that_is_no_bool_names_file_and_line(tmp_path):
    assert error([*REQUIRED, "--config_file", str(write(tmp_path, "# x\nfp8_base_unet = \"maybe\"\n"))]) == \
        "fp8_base_unet: expected true or false, got 'maybe' (in train.toml line 2)"
    assert error([*REQUIRED, "--unsloth_offload_checkpointing=maybe"]) == \
        "unsloth_offload_checkpointing: expected true or false, got 'maybe'"


def test_unsloth_offload_checkpointing_is_kohyas_offloaded_checkpointing(tmp_path):
    c = load(tmp_path, "unsloth_offload_checkpointing = true\n")
    assert (c.cpu_offload_checkpointing, c.gradient_checkpointing) == (True, True)
    # kohya: "unsloth_offload_checkpointing is enabled, so gradient_checkpointing is also enabled"
    assert c.notices == ["unsloth_offload_checkpointing = true: turns on gradient_checkpointing too, as kohya does"]
    c = load(tmp_path, "gradient_checkpointing = false\nunsloth_offload_checkpointing = true\n")
    assert c.gradient_checkpointing is True and len(c.notices) == 1
    c = load(tmp_path, "gradient_checkpointing = true\nunsloth_offload_checkpointing = true\n", "--blocks_to_swap", "2")
    assert (c.memory_options()["cpu_offload_checkpointing"], c.blocks_to_swap, c.notices) == (True, 2, [])
    assert parse_train_args([*REQUIRED, "--unsloth_offload_checkpointing"]).notices == [
        "--unsloth_offload_checkpointing = true: turns on gradient_checkpointing too, as kohya does"]
    assert load(tmp_path, "unsloth_offload_checkpointing = false\n").memory_options() == \
        parse_train_args(REQUIRED).memory_options()


def test_switches_in_help_and_reference():
    text = build_train_parser().format_help()
    assert "--fp8_base_unet [BOOL]" in text and "--no-unsloth_offload_checkpointing" in text
    assert "kohya's fp8 for the DiT alone" in text and "kohya's name of --compile_blocks" in text
    rows = {line.split(" | ")[0].strip("| `"): line for line in render_reference().splitlines()
            if line.startswith("| `")}
    assert rows["fp8_base"].endswith("| `fp8_base_unet` |")
    assert rows["cpu_offload_checkpointing"].endswith("| `unsloth_offload_checkpointing` |")


def test_fp8_scaled_is_said_once(tmp_path):
    c = load(tmp_path, "fp8_base = true\nfp8_scaled = true\n")
    assert (c.fp8_base, c.notices) == (True, [f"fp8_scaled = true: {FP8_SCALED_TEXT}"])
    assert load(tmp_path, "fp8_scaled = false\n").notices == [f"fp8_scaled = false: {FP8_SCALED_TEXT}"]
    assert load(tmp_path, "fp8_base_unet = true\nfp8_scaled = true\n").notices == \
        [f"fp8_scaled = true: {FP8_SCALED_TEXT}"]


def test_fp8_scaled_without_fp8_base_is_refused_with_file_and_line(tmp_path):
    # it asks for fp8 storage: training in full precision instead would give another result
    assert error([*REQUIRED, "--config_file", str(write(tmp_path, "[a]\nfp8_scaled = true\n"))]) == \
        ("fp8_scaled: needs fp8_base (fp8 storage is always scaled in anima-trainer); set fp8_base = true, or remove "
         "fp8_scaled (in train.toml line 2)")
    assert error([*REQUIRED, "--fp8_scaled"]).endswith("or remove fp8_scaled (on the command line)")


def test_save_model_as_safetensors_works_silently(tmp_path):
    for value in ("safetensors", "SafeTensors"):
        assert load(tmp_path, f'save_model_as = "{value}"\n').notices == []
    assert parse_train_args([*REQUIRED, "--save_model_as", "safetensors"]).notices == []


def test_save_model_as_other_formats_are_refused_with_file_and_line(tmp_path):
    assert error([*REQUIRED, "--config_file", str(write(tmp_path, 'output_name = "x"\nsave_model_as = "ckpt"\n'))]) \
        == ("save_model_as: 'ckpt' is not written by anima-trainer: only safetensors files are written (use "
            "save_model_as = \"safetensors\") (in train.toml line 2)")
    assert error([*REQUIRED, "--save_model_as", "pt"]) == (
        "save_model_as: 'pt' is not written by anima-trainer: only safetensors files are written (use save_model_as "
        "= \"safetensors\") (on the command line)")
