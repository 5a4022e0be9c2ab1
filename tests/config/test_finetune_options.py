"""The fine-tune mode's options (config/finetune_settings.py): what it refuses with the fix, the notices of the
adapter options it ignores, and that it never trains the text encoder."""

from __future__ import annotations

import pytest

from anima_trainer.config.errors import ConfigError
from anima_trainer.config.train import make_train_config

PATHS = dict(pretrained_model_name_or_path="d", qwen3="q", vae="v", output_dir="o", dataset_config="ds")
FINETUNE = {**PATHS, "training_mode": "finetune"}


def test_defaults_are_the_adapter_mode():
    cfg = make_train_config(PATHS)
    assert cfg.training_mode == "network" and not cfg.finetunes and cfg.finetune_notices() == []
    assert cfg.trainable_patterns is None and cfg.finetune_llm_adapter is False


def test_finetune_trains_no_text_encoder_and_notices_adapter_options():
    cfg = make_train_config({**FINETUNE, "network_dim": 16, "network_args": {"train_norm": "true"},
                             "mixed_precision": "bf16", "trainable_patterns": r"^blocks\.1\.", "save_format": "kohya"})
    assert cfg.finetunes and not cfg.trains_text_encoder and cfg.trainable_patterns == [r"^blocks\.1\."]
    notes = cfg.finetune_notices()
    assert [n.split(":")[0] for n in notes] == ["network_dim", "network_args", "save_format",
                                                  "mixed_precision = \"bf16\""]
    assert "held in bf16 and updated with exactly compensated steps" in notes[3]
    full = make_train_config({**FINETUNE, "mixed_precision": "bf16", "full_bf16": True}).finetune_notices()
    assert len(full) == 1 and full[0].startswith("full_bf16 = true: the fine-tuned weights are held in bf16 and "
                                                 "updated with exactly compensated steps")
    fp16 = make_train_config({**FINETUNE, "mixed_precision": "fp16"}).finetune_notices()
    assert len(fp16) == 1 and "held and updated in fp16" in fp16[0]
    assert make_train_config({**FINETUNE, "mixed_precision": "fp16", "full_fp16": True}).finetune_notices() == []
    # an adapter's max-norm: one notice, then off (the loop applies it only to adapters)
    cfg = make_train_config({**FINETUNE, "scale_weight_norms": 1.0})
    assert cfg.scale_weight_norms is None and cfg.model_copy(update={"seed": 3}).finetune_notices()[0].startswith(
        "scale_weight_norms: an adapter-network option")


@pytest.mark.parametrize(("option", "value", "why"), [
    ("fp8_compute", True, "trained Linears' forward on fp8-rounded weights"),
    ("network_weights", "w.safetensors", "starts an adapter"),
])
def test_what_a_finetune_cannot_honour_is_refused_with_the_fix(option, value, why):
    with pytest.raises(ConfigError, match=rf"{option}: .*{why}.*remove it for training_mode = \"finetune\""):
        make_train_config({**FINETUNE, option: value})


def test_memory_levers_of_frozen_weights_are_accepted_in_a_finetune():
    """blocks_to_swap, fp8_base (frozen blocks and Linears only: train/finetune_plan.py) and vram_budget_gb."""
    cfg = make_train_config({**FINETUNE, "blocks_to_swap": 4, "fp8_base": True, "vram_budget_gb": 24})
    assert (cfg.blocks_to_swap, cfg.fp8_base, cfg.vram_budget_gb) == (4, True, 24)


def test_finetune_options_need_the_mode_and_an_llm_adapter_lr_opts_in():
    """kohya's anima_train.py trains the LLM adapter at llm_adapter_lr: a rate above 0 opts in (one notice); 0 and
    unset leave the opt-in off."""
    with pytest.raises(ConfigError, match=r"trainable_patterns: .*training_mode is \"network\""):
        make_train_config({**PATHS, "trainable_patterns": ["cross_attn"]})
    cfg = make_train_config({**FINETUNE, "llm_adapter_lr": 1e-5})
    assert cfg.finetune_llm_adapter and cfg.llm_adapter_lr == 1e-5
    assert cfg.finetune_notices() == ["llm_adapter_lr = 1e-05: the LLM adapter trains at this rate, as in kohya's "
                                      "anima_train.py (finetune_llm_adapter turned on)"]
    cfg = make_train_config({**FINETUNE, "llm_adapter_lr": 1e-5, "finetune_llm_adapter": True})
    assert cfg.llm_adapter_lr == 1e-5 and cfg.finetune_notices() == []
    assert not make_train_config({**FINETUNE, "llm_adapter_lr": 0}).finetune_llm_adapter
    with pytest.raises(ConfigError, match="not a regular expression"):
        make_train_config({**FINETUNE, "trainable_patterns": ["blocks.(1"]})


def test_finetune_evaluates_and_preserves_with_a_notice_of_the_preservation_cost():
    """eval_every_n_* and preservation_loss_weight work in a fine-tune (its strength: W0 + m·(W − W0)); the
    preservation loss's weight swaps get one start-up notice, the evaluation none."""
    cfg = make_train_config({**FINETUNE, "eval_every_n_steps": 5, "eval_every_n_epochs": 1})
    assert cfg.evaluates and cfg.finetune_notices() == []
    cfg = make_train_config({**FINETUNE, "preservation_loss_weight": 0.5})
    (note,) = cfg.finetune_notices()
    assert note.startswith("preservation_loss_weight = 0.5 in a fine-tune: the base model's output needs every "
                           "trained tensor set to its base value and back")
    assert "2 bytes per trained bf16 parameter" in note and "trainable_patterns" in note
