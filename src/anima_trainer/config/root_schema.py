"""The root-style Anima_Trainer TOML (FHfanshu/Anima_Trainer v1.02 `anima_train.py --config`): its sections,
keys and the defaults that trainer used when a key is absent (seed_system.md §6.2), and how to recognise such a
file.  Kept apart from the converter so the training-TOML reader can recognise the format cheaply.

A default of `None` marks a key v1.02 itself does not read but sd-scripts-anima's converter understood
("ext" in §6.2): absent means "not set".
"""

from __future__ import annotations

from typing import Any

INF = float("inf")

ROOT_SCHEMA: dict[str, dict[str, Any]] = {
    "model": {"transformer_path": "", "vae_path": "", "text_encoder_path": "", "t5_tokenizer_path": "",
              "t5_tokenizer_dir": None},
    "dataset": {"data_dir": "", "resolution": 1024, "min_reso": 512, "max_reso": 2048, "reso_step": 64,
                "max_ar": 2.0, "repeats": 1, "shuffle_caption": False, "shuffle_caption_per_epoch": False,
                "keep_tokens": 0, "keep_tokens_separator": None, "caption_extension": None, "flip_augment": False,
                "cache_latents": False, "cache_dir": ""},
    "lora": {"lora_name": "", "network_type": "lora", "lora_rank": 32, "lora_alpha": 16.0, "lora_dropout": 0.0,
             "lora_targets": "", "anima_target_preset": "v101", "lokr_factor": 8, "lokr_full_matrix": False,
             "lokr_decompose_both": False, "lokr_rank_dropout": 0.0, "lokr_module_dropout": 0.0,
             "lokr_use_tucker": False, "lokr_constraint": 0.0, "lokr_normalize": False},
    "training": {"epochs": 1, "max_steps": 0, "batch_size": 1, "grad_accum": 1, "grad_clip": 0.0,
                 "learning_rate": 5e-5, "mixed_precision": "bf16", "grad_checkpoint": False, "num_workers": 0,
                 "persistent_data_loader_workers": None, "xformers": False, "seed": 42, "seq_len": 512,
                 "noise_offset": None, "caption_tag_dropout_rate": None, "resume": "", "lr_scheduler": None,
                 "lr_min_ratio": None, "lr_warmup_steps": None, "lr_warmup_ratio": None,
                 "lr_scheduler_num_cycles": None, "train_parts": "dit_llm_adapter", "auto_install": False,
                 "text_cache_size": 256, "log_every": 10, "max_token_length": None, "interactive": False},
    "optimizer": {"type": "adamw", "weight_decay": 0.01, "eps": 1e-8, "beta1": 0.9, "beta2": 0.999,
                  "prodigy_beta3": 0.999, "prodigy_d0": 1e-6, "prodigy_d_coef": 1.0, "prodigy_growth_rate": INF,
                  "prodigy_slice_p": 1, "prodigy_decouple": True, "prodigy_use_bias_correction": True,
                  "prodigy_safeguard_warmup": True},
    "output": {"output_dir": "./output", "output_name": "anima_lora", "save_every": 0, "save_state": True,
               "save_state_every": 0, "comfyui_format": False},
    "progress": {"loss_curve_steps": 100, "no_progress": False, "no_live_curve": True},
    "monitor": {"enabled": True, "every": 5, "memory": True, "wandb": True, "alert_policy": "warn"},
    "wandb": {"enabled": False, "project": "", "entity": "", "name": "", "group": "", "tags": "",
              "mode": "online", "log_every": 1},
}

# Keys that only a root-style file has (not kohya / anima-trainer option names): recognising the format by
# them, not by the table names, keeps a kohya TOML that happens to use [model] / [training] tables working
# (sd-scripts-anima's detector keyed on the table names; seed_system.md §8.2 #25).
ROOT_ONLY_KEYS: dict[str, frozenset[str]] = {
    "model": frozenset({"transformer_path", "vae_path", "text_encoder_path"}),
    "dataset": frozenset({"data_dir", "min_reso", "max_reso", "reso_step", "max_ar", "flip_augment"}),
    "lora": frozenset({"lora_rank", "lora_alpha", "network_type", "lora_targets", "lokr_factor"}),
    "training": frozenset({"epochs", "max_steps", "grad_accum", "grad_clip", "grad_checkpoint", "train_parts"}),
}


def root_style_evidence(data: dict[str, Any]) -> list[str]:
    """The root-only keys found in `data` (a parsed TOML) as "table.key"; empty for any other file."""
    found = []
    for table, keys in ROOT_ONLY_KEYS.items():
        section = data.get(table)
        if isinstance(section, dict):
            found += [f"{table}.{k}" for k in sorted(keys & set(section))]
    return found


def is_root_style(data: dict[str, Any]) -> bool:
    """A root-style Anima_Trainer config: at least one root-only key inside one of its tables."""
    return bool(root_style_evidence(data))
