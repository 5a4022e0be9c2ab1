"""kohya's "unset", as GUIs write it: one pass over the raw settings before any field is validated.

Why: kohya's options default to None, and the GUIs that write training TOMLs (kohya_ss, sd-scripts-anima's
launchers) write an option they leave unset as `""` (some as `"None"`, a list option as `[]`).  A value spelled
that way here means "not given": the field keeps its default (None for most).  Which spellings count depends on
the option, as each was accepted before this pass replaced the per-field validators: a path or a free-text
option is unset only by `""` (a name of spaces is a name), a choice or a number also by blanks and `"None"`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _empty(v: Any) -> bool:
    return isinstance(v, str) and v == ""


def _empty_or_list(v: Any) -> bool:
    return _empty(v) or (isinstance(v, list) and not v)


def _blank(v: Any) -> bool:
    return isinstance(v, str) and not v.strip()


def _blank_or_none(v: Any) -> bool:
    return isinstance(v, str) and v.strip() in ("", "None")


def _blank_none_or_list(v: Any) -> bool:
    return v is None or _blank_or_none(v) or (isinstance(v, list) and not v)


def _blank_or_none_value(v: Any) -> bool:
    return v is None or _blank_or_none(v)


_RULES: dict[Callable[[Any], bool], tuple[str, ...]] = {
    # paths (relative paths stay relative to the working directory; "" is no path)
    _empty: ("pretrained_model_name_or_path", "qwen3", "vae", "llm_adapter_path", "qwen3_tokenizer_path",
             "t5_tokenizer_path", "output_dir", "network_weights", "dataset_config", "logging_dir", "sample_prompts",
             "log_tracker_config", "tensorboard_logdir", "console_log_file", "tokenizer_cache_dir",
             # free text and numbers kohya leaves at None
             "log_prefix", "log_tracker_name", "wandb_run_name", "wandb_api_key", "resume", "validation_seed",
             "validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps", "save_precision",
             "eval_every_n_steps", "eval_every_n_epochs", "eval_prompts", "eval_trigger",
             "noise_offset", "adaptive_noise_scale", "multires_noise_iterations", "ip_noise_gamma", "min_timestep",
             "max_timestep", "min_snr_gamma", "v_pred_like_loss", "lr_scheduler_args"),
    _empty_or_list: ("scale_weight_norms", "self_attn_lr", "cross_attn_lr", "mlp_lr", "mod_lr", "llm_adapter_lr",
                     "base_weights", "base_weights_multiplier"),
    # sd-scripts-anima: an empty source means the default source
    _blank: ("attention_backend", "t5_tokenizer_repo_id", "t5_tokenizer_subfolder", "t5_tokenizer_modelscope_repo_id",
             "t5_tokenizer_modelscope_revision", "t5_tokenizer_modelscope_subfolder"),
    _blank_or_none: ("compile_mode", "compile_backend", "compile_cache_size_limit", "lr_scheduler_num_cycles",
                     "lr_scheduler_power", "lr_scheduler_min_lr_ratio", "lr_scheduler_timescale", "lr_scheduler_type",
                     "save_n_epoch_ratio", "initial_epoch", "initial_step"),
    _blank_none_or_list: ("text_encoder_lr",),
    # None too: kohya's blocks_to_swap None is "no swap" (our 0), checkpoint_blocks None is "all blocks"
    _blank_or_none_value: ("checkpoint_blocks", "blocks_to_swap"),
}
UNSET_RULE: dict[str, Callable[[Any], bool]] = {name: rule for rule, names in _RULES.items() for name in names}


def drop_unset(values: Any) -> Any:
    """`values` (raw settings by canonical name) without the ones spelled as kohya's "unset"."""
    if not isinstance(values, dict):
        return values
    return {k: v for k, v in values.items() if not (k in UNSET_RULE and UNSET_RULE[k](v))}
