"""Tables of kohya / sd-scripts-anima option names: aliases we accept, and options we know but do not implement.

Sources (facts only): docs `kohya_anima.md` §1 (kohya-ss/sd-scripts `anima_train_network.py` flags) and
`seed_system.md` §1.2–1.4 (sd-scripts-anima flags and optimizer aliases).
"""

from __future__ import annotations

# --- aliases -------------------------------------------------------------------------------------------------
# sd-scripts-anima's names for the same settings (seed_system.md §1.2, "Naming note").  Accepted on the command
# line and in a TOML; giving an alias and its canonical name with different values is an error.
ALIASES: dict[str, str] = {
    "anima_transformer": "pretrained_model_name_or_path",
    "qwen": "qwen3",
    "t5_tokenizer_dir": "t5_tokenizer_path",
    "anima_timestep_sampling": "timestep_sampling",
    "anima_sigmoid_scale": "sigmoid_scale",
    "anima_flow_shift": "discrete_flow_shift",
    # monitoring (seed_system.md §5); for the two ratios 0 means "the default", as in sd-scripts-anima
    "anima_monitor_memory": "monitor_memory",
    "anima_monitor_alert_policy": "monitor_alert_policy",
    "anima_monitor_memory_warn_ratio": "memory_warn_ratio",
    "anima_monitor_loss_spike_ratio": "loss_spike_ratio",
    # kohya-ss/sd-scripts 0.11.1 per-block compile (kohya_anima.md §4.11); compile_mode, compile_backend,
    # compile_fullgraph and compile_cache_size_limit are TrainConfig fields under kohya's own names
    "compile": "compile_blocks",
}

# sd-scripts-anima's `anima_timestep_sampling` values → kohya's `timestep_sampling` values.  Its `logit_normal`
# is t = sigmoid(scale·N(0,1)) followed by the flow shift, which is kohya's `shift`.  Its `uniform` is also
# shifted, which kohya's `uniform` is not: that case is only accepted with a shift of 1 (see train.py).
ANIMA_TIMESTEP_SAMPLING_VALUES: dict[str, str] = {"logit_normal": "shift", "uniform": "uniform"}

# sd-scripts-anima defaults that apply when one of its timestep aliases is used (seed_system.md §1.2).
SD_SCRIPTS_ANIMA_TIMESTEP_ALIASES = ("anima_timestep_sampling", "anima_sigmoid_scale", "anima_flow_shift")
SD_SCRIPTS_ANIMA_TIMESTEP_DEFAULTS = {"timestep_sampling": "shift", "discrete_flow_shift": 3.0}

# --- optimizers / schedulers / network modules ---------------------------------------------------------------
# kohya's `--optimizer_type` names (kohya_anima.md §1.3); matching is case-insensitive as in kohya.  All are
# implemented (train/optim.py SPECS, which also takes torch.optim / pytorch_optimizer classes and module.Class).
KOHYA_OPTIMIZERS = [
    "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion", "Lion8bit", "PagedLion8bit",
    "SGDNesterov", "SGDNesterov8bit", "DAdaptation", "DAdaptAdamPreprint", "DAdaptAdaGrad", "DAdaptAdam",
    "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD", "Prodigy", "AdaFactor", "RAdamScheduleFree",
    "AdamWScheduleFree", "SGDScheduleFree",
]
# sd-scripts-anima's underscore aliases (seed_system.md §1.4).
OPTIMIZER_ALIASES = {
    "radam_schedulefree": "RAdamScheduleFree",
    "adamw_schedulefree": "AdamWScheduleFree",
    "sgd_schedulefree": "SGDScheduleFree",
}
# kohya's `--lr_scheduler` names (all implemented in train/schedulers.py)
KOHYA_SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt",
    "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant", "adafactor",
)

# network_module → our algorithm; "lycoris" means: take it from network_args algo (LyCORIS convention)
NETWORK_MODULE_ALGOS = {
    "networks.lora_anima": "lora", "networks.lora": "lora", "anima_trainer.networks.lora": "lora", "lora": "lora",
    "networks.lokr": "lokr", "anima_trainer.networks.lokr": "lokr", "lokr": "lokr",
    "networks.loha": "loha", "anima_trainer.networks.loha": "loha", "loha": "loha",
    "lycoris.kohya": "lycoris",
}
ACCEPTED_NETWORK_MODULES = tuple(NETWORK_MODULE_ALGOS)
LYCORIS_ALGOS = ("lokr", "loha")  # `algo=` values accepted with lycoris.kohya
# sd-scripts-anima's LoKr: other network_args names (lokr_factor, ...) and a clamped factor; not supported
KNOWN_UNIMPLEMENTED_NETWORK_MODULES = ("networks.lokr_anima",)
# What the `ss_network_module` metadata says for our modules (kohya's name for the same file format).
KOHYA_NETWORK_MODULE_NAME = {"lora": "networks.lora_anima", "lokr": "networks.lokr", "loha": "networks.loha"}

# --- known but not implemented -------------------------------------------------------------------------------
# name → values that are accepted (and dropped) because with them the option does nothing anima-trainer does not
# already do (typically kohya's own "off" default, as GUI-written TOMLs list every option).  Any other value, and
# any use on the command line, is a ConfigError.  An extra hint may follow the error.
OFF: tuple = (False,)  # store_true flags: `x = false` is what we do anyway
UNSET: tuple = ("",)  # options whose kohya default is None: a TOML can only say "unset" with ""
_DATASET_HINT = "dataset settings are read only from the --dataset_config TOML"
_ATTENTION_HINT = ("attention always runs on torch SDPA; choose its kernel with attention_backend = auto | cudnn | "
                   "flash | efficient | math (xformers, the flash-attn package and SageAttention are not supported)")
_COMPILE_HINT = ("whole-model compile through accelerate is not implemented; use compile_blocks (kohya's --compile: "
                 "per-block torch.compile) with compile_backend / compile_mode")


def _table() -> dict[str, tuple[tuple, str]]:
    t: dict[str, tuple[tuple, str]] = {}

    def add(names: str, inert: tuple, hint: str = "") -> None:
        for n in names.split():
            t[n] = (inert, hint)

    # kohya_anima.md §1.1 (Anima flags) and the options it lists as ignored/unsupported for Anima
    add("qwen3_max_token_length t5_max_token_length", (512,))
    # attention is always torch SDPA (its kernel: attention_backend); torch/sdpa values say just that
    add("attn_mode", ("", "torch", "sdpa"), _ATTENTION_HINT)
    add("anima_attention_backend", ("torch",), _ATTENTION_HINT)
    add("sdpa", (True, False), _ATTENTION_HINT)
    add("xformers xfomers", OFF, _ATTENTION_HINT)
    # kohya's --compile family: compile (alias), compile_mode/_backend/_fullgraph/_cache_size_limit are fields
    add("compile_dynamic", ("", False, "false", "False"), "anima-trainer compiles static shapes, one graph per "
        "bucket token count (compile_blocks); dynamic shapes are not offered")
    add("torch_compile", OFF, _COMPILE_HINT)
    add("dynamo_backend", ("", "inductor", "no", "NO"), _COMPILE_HINT)
    add("split_attn vae_disable_cache qwen_image_vae_2d "
        "cuda_allow_tf32 cuda_cudnn_benchmark v2 v_parameterization "
        "weighted_captions debiased_estimation_loss fused_backward_pass noise_offset_random_strength",
        OFF)
    add("vae_chunk_size self_attn_lr cross_attn_lr mlp_lr mod_lr llm_adapter_lr "
        "show_timesteps clip_skip max_token_length noise_offset multires_noise_iterations "
        "adaptive_noise_scale min_snr_gamma v_pred_like_loss min_timestep max_timestep", UNSET)
    add("show_timesteps_resolution", ("", 1024))
    add("multires_noise_discount", (0.3,))
    add("sample_sampler", ("", "euler"), "the sampler is always Euler (flow matching)")
    # §1.2 DiT-shared
    add("disable_mmap_load_safetensors", OFF)
    # §1.3 generic train_network flags
    add("no_metadata output_config network_train_text_encoder_only persistent_data_loader_workers "
        "full_bf16 full_fp16 lowram highvram "
        "skip_cache_check deepspeed ddp_gradient_as_bucket_view "
        "ddp_static_graph ip_noise_gamma_random_strength masked_loss alpha_mask "
        "skip_until_initial_step save_state_to_huggingface resume_from_huggingface "
        "async_upload log_config console_log_simple", OFF)
    add("training_comment metadata_title metadata_author metadata_description metadata_license metadata_tags "
        "metadata_trigger_phrase metadata_usage_hint metadata_thumbnail metadata_merged_from text_encoder_lr "
        "scale_weight_norms base_weights base_weights_multiplier ddp_timeout ip_noise_gamma save_n_epoch_ratio "
        "initial_epoch initial_step huggingface_repo_id console_log_file", UNSET)
    add("zero_stage", (2,))
    add("huber_schedule", ("constant",))  # our huber_c is used as a constant (kohya's "constant" schedule)
    add("huber_scale", (1.0,))
    # dataset-on-CLI options (kohya_anima.md §1.3, §1.4)
    add("train_data_dir reg_data_dir in_json resolution skip_image_resolution", UNSET, _DATASET_HINT)
    add("enable_bucket bucket_no_upscale shuffle_caption color_aug random_crop flip_aug", OFF, _DATASET_HINT)
    add("min_bucket_reso", (256,), _DATASET_HINT)
    add("max_bucket_reso", (1024,), _DATASET_HINT)
    add("bucket_reso_steps", (64,), _DATASET_HINT)
    add("caption_extension", (".caption", ".txt"), _DATASET_HINT)
    add("keep_tokens token_warmup_step", (0,), _DATASET_HINT)
    add("caption_dropout_rate caption_tag_dropout_rate", (0.0,), _DATASET_HINT)
    # seed_system.md §1.2 (sd-scripts-anima)
    add("anima_seq_len", (512,))
    # (the t5_tokenizer_* download/validation flags are TrainConfig fields: download/startup.py)
    add("train_norm anima_resume_snapshot_strict resume_ignore_optimizer_mismatch", OFF)
    add("anima_noise_offset", (0.0,))
    # network_train_unet_only: anima-trainer trains the DiT only, which is what `true` asks for
    add("network_train_unet_only", (True,), "anima-trainer trains the DiT only (network_train_unet_only = true); "
        "text-encoder LoRA is not implemented")
    return t


UNIMPLEMENTED: dict[str, tuple[tuple, str]] = _table()


def is_inert(name: str, value: object) -> bool:
    """True when `value` for the unimplemented option `name` asks for nothing we do not already do."""
    inert, _ = UNIMPLEMENTED[name]
    # bool is an int in Python: only compare bools with bools and non-bools with non-bools
    return any(isinstance(value, bool) == isinstance(v, bool) and value == v for v in inert)


def unimplemented_message(name: str, shown: str) -> str:
    """The error for the unimplemented option `name`, written as the user wrote it (`shown`)."""
    _, hint = UNIMPLEMENTED[name]
    msg = f"option '{shown}' is a kohya/sd-scripts-anima option that anima-trainer does not implement yet"
    return f"{msg} ({hint})" if hint else msg
