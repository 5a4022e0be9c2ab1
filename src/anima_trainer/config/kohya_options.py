"""Tables of kohya / sd-scripts-anima option names: aliases, and the rule for every option that is not a field.

Sources (facts only): docs `kohya_anima.md` §1 (kohya-ss/sd-scripts `anima_train_network.py` flags) and
`seed_system.md` §1.2–1.4 (sd-scripts-anima flags and optimizer aliases).
"""

from __future__ import annotations

from dataclasses import dataclass

# --- aliases -------------------------------------------------------------------------------------------------
# sd-scripts-anima's names for the same settings (seed_system.md §1.2, "Naming note").  Accepted on the command
# line and in a TOML; giving an alias and its canonical name with different values is an error.
ALIASES: dict[str, str] = {
    "anima_transformer": "pretrained_model_name_or_path",
    "qwen": "qwen3",
    "t5_tokenizer_dir": "t5_tokenizer_path",
    "anima_noise_offset": "noise_offset",  # sd-scripts-anima: the same per-(sample, channel) offset · N(0,1)
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
    # the name of kohya's Anima pull request (#2260, before 2026-02-09), still written by Anima-Standalone-Trainer;
    # its values and default shift 3.0 are sd-scripts-anima's (see below)
    "timestep_sample_method": "timestep_sampling",
    # kohya's switches (SWITCHES below): their own rule, not a conflict with the setting's own name
    "fp8_base_unet": "fp8_base",
    "unsloth_offload_checkpointing": "cpu_offload_checkpointing",
}
# kohya's store_true flags whose `false` in a TOML is kohya's default written out (kohya's --output_config writes every
# flag; GUIs write `torch_compile = false`), not a request: our default stays, read as the named field's `false`
# (compile = false → torch_compile = false: compile_blocks stays "auto", with one notice, config/vae_settings.py).
# `compile_blocks = false` or `--compile false` on the command line asks for eager.
KOHYA_DEFAULT_OFF: dict[str, str] = {"compile": "torch_compile"}
# aliases that are kohya's own names (help and docs say so; the others are sd-scripts-anima's)
KOHYA_ALIASES = frozenset({"compile", "fp8_base_unet", "unsloth_offload_checkpointing"})
# aliases that are another trainer's name rather than sd-scripts-anima's: one start-up notice says what they became
ALIAS_NOTICES: dict[str, str] = {
    "timestep_sample_method": "the name of kohya's Anima pull request (Anima-Standalone-Trainer writes it), mapped "
                              "to timestep_sampling (logit_normal = \"shift\": logit-normal t shifted by "
                              "discrete_flow_shift, default 3.0 as there)",
}

# kohya's switches that kohya reads beside the setting they turn on (`args.fp8_base or args.fp8_base_unet`): `true`
# sets the settings listed, `false` asks for nothing.  Each name keeps its own precedence (command line > TOML), so a
# switch never conflicts with the setting's own name: `fp8_base = false` with `fp8_base_unet = true` stores the DiT in
# fp8, as in kohya.  kohya_anima.md §1.1: fp8_base_unet is fp8 for the DiT alone (the text encoder stays in the
# mixed precision; kohya's FLUX/SD3 trainers turn fp8_base on with it), which is all anima-trainer's fp8_base
# stores in fp8 anyway; unsloth_offload_checkpointing is checkpointing that keeps each block's input in CPU memory
# and turns gradient_checkpointing on ("... is enabled, so gradient_checkpointing is also enabled").
SWITCHES: dict[str, dict[str, bool]] = {
    "fp8_base_unet": {"fp8_base": True},
    "unsloth_offload_checkpointing": {"cpu_offload_checkpointing": True, "gradient_checkpointing": True},
}
SWITCH_HELP = {
    "fp8_base_unet": "kohya's fp8 for the DiT alone (its text encoder stays in mixed_precision): turns on "
                     "--fp8_base, which stores only the DiT in fp8",
    "unsloth_offload_checkpointing": "kohya's CPU-offloaded checkpointing: turns on --cpu_offload_checkpointing "
                                     "and, as in kohya, --gradient_checkpointing",
}


def alias_help(alias: str) -> str:
    """What `--help` and docs/migration.md say about an alias: whose name it is, and what it sets."""
    canonical = ALIASES[alias]
    if alias in SWITCH_HELP:
        return SWITCH_HELP[alias]
    if alias in ALIAS_NOTICES:
        return f"another name of --{canonical}"
    who = "kohya's" if alias in KOHYA_ALIASES else "sd-scripts-anima"
    return f"{who} name of --{canonical}"


# sd-scripts-anima's `anima_timestep_sampling` values → kohya's `timestep_sampling` values.  Its `logit_normal`
# is t = sigmoid(scale·N(0,1)) followed by the flow shift, which is kohya's `shift`.  Its `uniform` is also
# shifted, which kohya's `uniform` is not: that case is only accepted with a shift of 1 (see train.py).
ANIMA_TIMESTEP_SAMPLING_VALUES: dict[str, str] = {"logit_normal": "shift", "uniform": "uniform"}

# sd-scripts-anima defaults that apply when one of its timestep aliases is used (seed_system.md §1.2).
SD_SCRIPTS_ANIMA_TIMESTEP_ALIASES = ("anima_timestep_sampling", "anima_sigmoid_scale", "anima_flow_shift",
                                     "timestep_sample_method")
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
# What the `ss_network_module` metadata says for our modules (kohya's name for the same file format).
KOHYA_NETWORK_MODULE_NAME = {"lora": "networks.lora_anima", "lokr": "networks.lokr", "loha": "networks.loha"}

# --- every option name of the tools users switch from ------------------------------------------------------
# kohya-ss/sd-scripts `anima_train_network.py` parser (v0.10.1 `48d368f` and v0.11.1 `6721028c`: setup_parser and
# everything it adds, dataset-on-CLI options included), collected by reading the parser functions.
KOHYA_OPTIONS: tuple[str, ...] = tuple("""
adaptive_noise_scale alpha_mask async_upload attn_mode base_weights base_weights_multiplier blocks_to_swap
bucket_no_upscale bucket_reso_steps cache_info cache_latents cache_latents_to_disk cache_text_encoder_outputs
cache_text_encoder_outputs_to_disk caption_dropout_every_n_epochs caption_dropout_rate caption_extension
caption_extention caption_prefix caption_separator caption_suffix caption_tag_dropout_rate clip_skip color_aug
compile compile_backend compile_cache_size_limit compile_dynamic compile_fullgraph compile_mode conditioning_data_dir
config_file console_log_file console_log_level console_log_simple cpu_offload_checkpointing cross_attn_lr
cuda_allow_tf32 cuda_cudnn_benchmark dataset_class dataset_config dataset_repeats ddp_gradient_as_bucket_view
ddp_static_graph ddp_timeout debiased_estimation_loss debug_dataset deepspeed dim_from_weights
disable_mmap_load_safetensors discrete_flow_shift dynamo_backend enable_bucket enable_wildcard face_crop_aug_range
flip_aug fp16_master_weights_and_gradients fp8_base fp8_base_unet full_bf16 full_fp16 fused_backward_pass
gradient_accumulation_steps gradient_checkpointing highvram huber_c huber_scale huber_schedule
huggingface_path_in_repo huggingface_repo_id huggingface_repo_type huggingface_repo_visibility huggingface_token
in_json initial_epoch initial_step ip_noise_gamma ip_noise_gamma_random_strength keep_tokens keep_tokens_separator
learning_rate llm_adapter_lr llm_adapter_path log_config log_prefix log_tracker_config log_tracker_name log_with
logging_dir logit_mean logit_std loss_type lowram lr_decay_steps lr_scheduler lr_scheduler_args
lr_scheduler_min_lr_ratio lr_scheduler_num_cycles lr_scheduler_power lr_scheduler_timescale lr_scheduler_type
lr_warmup_steps masked_loss max_bucket_reso max_data_loader_n_workers max_grad_norm max_timestep max_token_length
max_train_epochs max_train_steps max_validation_steps mem_eff_attn metadata_author metadata_description
metadata_is_negative_embedding metadata_license metadata_merged_from metadata_preprocessor metadata_tags
metadata_thumbnail metadata_title metadata_trigger_phrase metadata_usage_hint min_bucket_reso min_snr_gamma
min_timestep mixed_precision mlp_lr mod_lr mode_scale multires_noise_discount multires_noise_iterations
network_alpha network_args network_dim network_dropout network_module network_train_text_encoder_only
network_train_unet_only network_weights no_half_vae no_metadata noise_offset noise_offset_random_strength
offload_optimizer_device offload_optimizer_nvme_path offload_param_device offload_param_nvme_path optimizer_args
optimizer_type output_config output_dir output_name persistent_data_loader_workers pretrained_model_name_or_path
prior_loss_weight qwen3 qwen3_max_token_length qwen_image_vae_2d random_crop reg_data_dir resize_interpolation
resolution resume resume_from_huggingface sample_at_first sample_every_n_epochs sample_every_n_steps sample_prompts
sample_sampler save_every_n_epochs save_every_n_steps save_last_n_epochs save_last_n_epochs_state save_last_n_steps
save_last_n_steps_state save_model_as save_n_epoch_ratio save_precision save_state save_state_on_train_end
save_state_to_huggingface scale_v_pred_loss_like_noise_pred scale_weight_norms sdpa secondary_separator seed
self_attn_lr show_timesteps show_timesteps_resolution shuffle_caption sigmoid_scale skip_cache_check
skip_image_resolution skip_until_initial_step split_attn t5_max_token_length t5_tokenizer_path text_encoder_batch_size
text_encoder_lr timestep_sampling token_warmup_min token_warmup_step tokenizer_cache_dir torch_compile
train_batch_size train_data_dir train_inpainting training_comment unet_lr unsloth_offload_checkpointing use_8bit_adam
use_lion_optimizer v2 v_parameterization v_pred_like_loss vae vae_batch_size vae_chunk_size vae_disable_cache
validate_every_n_epochs validate_every_n_steps validation_seed validation_split wandb_api_key wandb_run_name
weighted_captions weighting_scheme xformers zero3_init_flag zero3_save_16bit_model zero_stage zero_terminal_snr
""".split())

# kohya's full fine-tune script `anima_train.py` (v0.11, read from its setup_parser): the options its parser has
# beyond anima_train_network.py's (the drop-in anima_train.py reads them; its component lrs are fields already).
KOHYA_FINETUNE_OPTIONS: tuple[str, ...] = ("use_safetensors", "skip_latents_validity_check")

# sd-scripts-anima's own options (seed_system.md §1.2; its converter's flags §6) beyond kohya's parser.
SD_SCRIPTS_ANIMA_OPTIONS: tuple[str, ...] = tuple("""
anima_transformer qwen t5_tokenizer_dir auto_download_t5_tokenizer t5_tokenizer_repo_id t5_tokenizer_subfolder
t5_tokenizer_modelscope_fallback t5_tokenizer_modelscope_repo_id t5_tokenizer_modelscope_revision
t5_tokenizer_modelscope_subfolder t5_tokenizer_validate_strict anima_attention_backend xfomers anima_seq_len
anima_timestep_sampling anima_sigmoid_scale anima_flow_shift anima_noise_offset train_norm anima_monitor_memory
anima_monitor_alert_policy anima_monitor_memory_warn_ratio anima_monitor_loss_spike_ratio anima_resume_snapshot_strict
resume_ignore_optimizer_mismatch auto_start_tensorboard tensorboard_host tensorboard_port tensorboard_logdir
input train_args_name dataset_name
""".split())

# --- the rule for every option that is not a TrainConfig field --------------------------------------------
@dataclass(frozen=True)
class Rule:
    """What anima-trainer does with an option that is not a field.

    kind "notice": accepted; one start-up notice `text` (what happens instead).  kind "error": refused with
    `text` (why, and the fix) unless the value is one of `accepted` (then it asks for nothing: a notice).
    kind "value": the values in `accepted` (strings in any case) work with kohya's meaning, silently; any other
    value is refused (`text` says what is done).  `inert`: values that ask for nothing (kohya's off/unset); the
    notice then says so.  `source`: who writes it.
    """

    kind: str
    text: str
    inert: tuple = ()
    accepted: tuple = ()
    source: str = "kohya"


OFF: tuple = (False, "", None)  # store_true flags: `x = false` is what we do anyway; "" = a GUI's unset
UNSET: tuple = ("", None)
_ATTENTION = ("attention runs on torch SDPA (the fastest kernel is measured at start-up; attention_backend "
              "chooses it), which gives the same result; nothing to change")
_DATASET = ("a dataset on the command line is translated by the drop-in anima_train_network.py, which writes it "
            "as a dataset.toml; with `anima-trainer train` put it into the --dataset_config TOML")
_DEEPSPEED = ("DeepSpeed is not used: a multi-GPU adapter run uses DDP, a multi-GPU fine-tune shards the DiT's "
              "weights, gradients and optimizer state with FSDP2 (fsdp_sharding; docs/multi_gpu.md); the memory "
              "levers are gradient_checkpointing, blocks_to_swap, fp8_base and vram_budget_gb (a fine-tune also: "
              "fused_backward_pass, optimizer_offload)")
# fused_backward_pass is a field (a fine-tune honours it); with an adapter network it is this notice
FUSED_BACKWARD_NETWORK = ("kohya's LoRA trainer ignores it too (only its full fine-tune uses it, and so does "
                          "training_mode = \"finetune\" here); the adapter's optimizer steps after the backward pass")
_HF = "only used with huggingface_repo_id, which anima-trainer does not upload to"
_LOSS_SD = "a loss weighting of epsilon/v-prediction models; kohya's Anima trainer ignores it too (flow matching)"
_CONTEXT = ("the text context is always padded to 512 tokens, as ComfyUI runs Anima: a shorter context would train "
            "a model ComfyUI does not run; captions longer than 512 tokens are truncated as in kohya")


def _rules() -> dict[str, Rule]:
    t: dict[str, Rule] = {}

    def notice(names: str, text: str, inert: tuple = OFF, source: str = "kohya") -> None:
        for n in names.split():
            t[n] = Rule("notice", text, inert, source=source)

    def error(names: str, text: str, accepted: tuple = OFF, source: str = "kohya") -> None:
        for n in names.split():
            t[n] = Rule("error", text, accepted, accepted, source)

    # attention implementation flags (kohya_anima.md §1.1)
    notice("xformers mem_eff_attn sdpa split_attn", _ATTENTION)
    notice("attn_mode", _ATTENTION, ("", None, "torch", "sdpa"))
    notice("anima_attention_backend xfomers", _ATTENTION, ("", None, "torch", False), source="sd-scripts-anima")
    # speed / memory switches with nothing to switch here
    notice("lowram highvram", "models are loaded straight to where they run (memory-mapped safetensors); nothing "
           "to change")
    notice("persistent_data_loader_workers", "data workers stay alive for the whole run anyway; nothing to change")
    notice("disable_mmap_load_safetensors", "safetensors are read memory-mapped; loading is the same either way")
    notice("cuda_allow_tf32", "anima-trainer leaves TF32 as PyTorch sets it (matmuls in the chosen precision); "
           "with mixed_precision = bf16 the DiT runs in bf16 either way")
    notice("cuda_cudnn_benchmark", "the DiT has no convolutions to tune; the VAE runs once per image when caching")
    notice("skip_cache_check", "cache files are content-addressed (their name is a hash of what they hold), so "
           "there is nothing to check or skip")
    notice("skip_latents_validity_check", "kohya's anima_train.py's old name of skip_cache_check: cache files are "
           "content-addressed (their name is a hash of what they hold), so there is nothing to check or skip")
    # anima_train.py's store_true format switch: its saver writes .safetensors whatever it says (kohya passes
    # use_safetensors=True to save_sd_model_*_common), so true and false (its default, as GUIs write it) both mean that
    t["use_safetensors"] = Rule("value", "only safetensors files are written (anima_train.py's full-model format "
                                "switch)", accepted=("true", "false"))
    # kohya's FLUX fine-tune (flux_train.py) options that fine-tune configs carry over to anima_train.py, whose
    # parser has none of them (kohya then ignores them in a TOML and refuses them on the command line)
    flux = "kohya flux_train.py"
    notice("mem_eff_save", "a kohya FLUX fine-tune option (kohya's anima_train.py has none): the DiT checkpoint is "
           "written from one host copy, as kohya's anima_train.py writes it; the file is the same", source=flux)
    notice("blockwise_fused_optimizers", "a kohya FLUX fine-tune option (kohya's anima_train.py has none): "
           "fused_backward_pass steps each parameter during the backward pass with AdamW, AdamW8bit or AdaFactor "
           "(kohya's only with Adafactor), which is what the block-wise optimizers are for; set "
           "fused_backward_pass = true",
           source=flux)
    notice("fused_optimizer_groups", "a kohya FLUX fine-tune option that kohya marks as not working (kohya's "
           "anima_train.py has none); fused_backward_pass is the per-parameter update", ("", None, 0), source=flux)
    notice("compile_dynamic", "blocks are compiled with static shapes, one graph per bucket token count "
           "(compile_blocks): the same math; nothing to change", ("", None, False, "false", "auto"))
    notice("deepspeed", _DEEPSPEED)
    notice("zero_stage", _DEEPSPEED, (2, "", None))
    notice("zero3_init_flag zero3_save_16bit_model fp16_master_weights_and_gradients", _DEEPSPEED)
    notice("offload_optimizer_device", _DEEPSPEED + "; a fine-tune (training_mode = \"finetune\") keeps its "
           "optimizer state in host memory with optimizer_offload = true", UNSET)
    notice("offload_optimizer_nvme_path offload_param_device offload_param_nvme_path", _DEEPSPEED, UNSET)
    notice("ddp_gradient_as_bucket_view ddp_static_graph", "no DDP wrapper: the network's gradients are "
           "all-reduced in buckets during the backward (ddp_bucket_cap_mb, docs/multi_gpu.md); the result is the same")
    notice("ddp_timeout", "the process group uses PyTorch's default timeout; the result is the same", UNSET)
    # options of SD / SDXL models that mean nothing for a flow-matching DiT (kohya ignores them for Anima too)
    notice("v2", "SD 2.x model flag; Anima is one architecture, detected from the file")
    notice("v_parameterization", "Anima is trained with flow matching (velocity target) whatever this says; "
           "kohya's Anima trainer ignores it too")
    notice("clip_skip", "SD's CLIP layer skip; Anima's text encoder is Qwen3 (kohya's Anima trainer ignores it)",
           UNSET)
    notice("max_token_length", "SD's CLIP token limit; Anima's limits are qwen3/t5_max_token_length", UNSET)
    notice("no_half_vae", "the VAE runs in float32 under fp16 and in bf16/float32 otherwise, which is already safe")
    notice("zero_terminal_snr", _LOSS_SD)
    notice("qwen3_max_token_length t5_max_token_length", _CONTEXT, (512, "512", "", None))
    notice("sample_sampler", "previews always use Euler (flow matching), as kohya's Anima sampler does",
           ("", None, "euler"))
    notice("show_timesteps_resolution", "only used by show_timesteps", ("", None, 1024, "1024"))
    notice("log_config", "the resolved settings are always written to <output_dir>/<output_name>.events.jsonl "
           "(event 'config')")
    notice("cache_info", "the dataset scan is fast and cached latents are found by content; no cache info file is "
           "written or read")
    notice("huggingface_path_in_repo huggingface_repo_type huggingface_repo_visibility huggingface_token "
           "async_upload save_state_to_huggingface", _HF, OFF)
    notice("huber_scale", "huber_c is used as the constant threshold (kohya's huber_schedule = \"constant\")",
           (1.0, 1, "", None))
    # fp8 storage (models/fp8.py) always keeps one fp32 scale per weight; without fp8_base it is refused
    # (rule_message): it asks for fp8 storage, and training without it would give another result
    notice("fp8_scaled", "fp8 storage (fp8_base) is always scaled in anima-trainer: one fp32 scale per weight, "
           "kohya's fp8_scaled; nothing to change", ())
    # the only format written, kohya's default; its ckpt / pt (pickles) are refused for an adapter (kohya's LoRA
    # trainer writes them); a fine-tune accepts any value with a notice (rule_message): kohya's anima_train.py
    # always writes .safetensors
    t["save_model_as"] = Rule("value", "only safetensors files are written", accepted=("safetensors",))
    # honouring is impossible and ignoring would change what was asked: refused, with the fix
    error("huber_schedule", "anima-trainer uses huber_c as a constant threshold (kohya's \"constant\"; kohya's "
          "default \"snr\" fails for Anima); set huber_schedule = \"constant\"",
          ("", None, "constant"))
    error("weighted_captions", "Anima's tokenizer has no weighted captions (kohya's Anima trainer fails with it "
          "too); remove it or set it to false")
    error("show_timesteps", "kohya plots the sampled timesteps and exits without training; anima-trainer has no "
          "such plot: remove it to train")
    error("debug_dataset", "kohya shows the dataset and exits without training; `anima-trainer cache` checks "
          "the dataset (its report lists every image); remove it to train")
    error("train_inpainting", "inpainting is a ControlNet-LLLite option of kohya, not trainable as a LoRA here; "
          "remove it")
    error("dataset_class", "a Python dataset class of kohya cannot run here; describe the data in --dataset_config",
          UNSET)
    error("huggingface_repo_id", "anima-trainer does not upload; upload the files in output_dir with "
          "`huggingface-cli upload`, and remove it", UNSET)
    error("resume_from_huggingface", "anima-trainer resumes from a local state folder; download the state and "
          "set resume to its folder")
    # dataset-on-CLI options (kohya_anima.md §1.3): the drop-in translates them; `train` needs a dataset TOML
    for n in ("train_data_dir reg_data_dir in_json resolution skip_image_resolution caption_prefix caption_suffix "
              "caption_separator keep_tokens_separator secondary_separator resize_interpolation dataset_repeats "
              "face_crop_aug_range caption_extention").split():  # caption_extention: kohya's old spelling
        t[n] = Rule("error", _DATASET, UNSET, UNSET)
    for n in ("enable_bucket bucket_no_upscale shuffle_caption color_aug random_crop flip_aug enable_wildcard"
              ).split():
        t[n] = Rule("error", _DATASET, OFF, OFF)
    for n, v in (("min_bucket_reso", 256), ("max_bucket_reso", 1024), ("bucket_reso_steps", 64),
                 ("keep_tokens", 0), ("token_warmup_step", 0), ("token_warmup_min", 1),
                 ("caption_dropout_every_n_epochs", 0), ("caption_dropout_rate", 0.0),
                 ("caption_tag_dropout_rate", 0.0)):
        t[n] = Rule("error", _DATASET, (v, float(v), str(v), "", None), (v, float(v), str(v), "", None))
    t["caption_extension"] = Rule("error", _DATASET, (".caption", ".txt", "", None), (".caption", ".txt", "", None))
    # keys GUIs and forks write into their TOMLs (item 5)
    gui = "kohya_ss GUI"
    notice("LoRA_type LyCORIS_preset model_list sdxl sdxl_cache_text_encoder_outputs sdxl_no_half_vae "
           "stop_text_encoder_training train_on_input additional_parameters extra_accelerate_launch_args "
           "main_process_port num_cpu_threads_per_process num_machines num_processes multi_gpu gpu_ids "
           "dynamo_mode dynamo_use_fullgraph dynamo_use_dynamic block_alphas block_dims block_lr_zero_threshold "
           "conv_block_alphas conv_block_dims conv_alphas conv_dims down_lr_weight mid_lr_weight up_lr_weight "
           "decompose_both rescaled unit constrain use_cp use_tucker use_scalar bypass_mode rank_dropout_scale "
           "module_dropout rank_dropout factor",
           "kohya_ss GUI bookkeeping: the GUI turns it into sd-scripts options (or network_args) itself; "
           "sd-scripts does not read it, and neither does anima-trainer", source=gui)
    notice("epoch", "kohya_ss GUI bookkeeping; sd-scripts does not read it (max_train_epochs does)", source=gui)
    notice("optimizer", "kohya_ss GUI bookkeeping; sd-scripts reads optimizer_type", source=gui)
    notice("lr_warmup", "kohya_ss GUI bookkeeping (a percentage); sd-scripts reads lr_warmup_steps", source=gui)
    notice("max_resolution", "kohya_ss GUI bookkeeping; sd-scripts reads resolution (dataset)", source=gui)
    notice("noise_offset_type", "kohya_ss GUI bookkeeping; sd-scripts does not read it", source=gui)
    ls = "lora-scripts(-next) GUI"
    ast = "Anima-Standalone-Trainer"
    notice("flash_attn", _ATTENTION, source=ast)
    error("timestep_bias_strategy", "diffusers' timestep bias is not a kohya option; shape the timesteps with "
          "timestep_sampling, sigmoid_scale and discrete_flow_shift", ("", None, "none"), source=ast)
    notice("template_version scope sample_scheduler model_train_type lora_type enable_preview positive_prompts "
           "negative_prompts sample_width sample_height "
           "sample_cfg sample_seed sample_steps randomly_choice_prompt prompt_file lycoris_algo conv_dim conv_alpha "
           "dropout lokr_factor dylora_unit enable_base_weight enable_block_weights ui_custom_params "
           "network_args_custom optimizer_args_custom lr_restart_cycles prefer_json_caption",
           "lora-scripts GUI key: the GUI turns it into sd-scripts options itself; sd-scripts does not read it, "
           "and neither does anima-trainer", source=ls)
    # the last options without a field after issue 14's merge
    error("alpha_mask", _DATASET)  # kohya's dataset-on-CLI switch; `alpha_mask = true` per subset in a dataset TOML
    notice("conditioning_data_dir", "on the command line kohya's LoRA trainer ignores it: mask folders come only "
           "from a [[datasets.subsets]] conditioning_data_dir (with masked_loss); move it there", UNSET)
    notice("input train_args_name dataset_name", "a flag of sd-scripts-anima's config converter (anima-trainer "
           "convert-config takes it); it changes nothing in training", UNSET, source="sd-scripts-anima")
    return t


RULES: dict[str, Rule] = _rules()

# Names of older releases and of other trainers: "did you mean" names the current kohya option first
# (kohya_anima.md §7: the PR fork's --dit_path/--qwen3_path/--vae_path/--timestep_sample_method).
RENAMED: dict[str, str] = {
    "dit_path": "pretrained_model_name_or_path", "dit": "pretrained_model_name_or_path",
    "transformer_path": "pretrained_model_name_or_path", "model_path": "pretrained_model_name_or_path",
    "qwen3_path": "qwen3", "text_encoder": "qwen3", "text_encoder_path": "qwen3", "qwen_path": "qwen3",
    "vae_path": "vae", "t5_tokenizer": "t5_tokenizer_path", "qwen3_tokenizer": "qwen3_tokenizer_path",
    "llm_adapter": "llm_adapter_path",
    "timestep_bias_begin": "min_timestep", "timestep_bias_end": "max_timestep",
    "timestep_bias_multiplier": "timestep_sampling", "timestep_bias_portion": "timestep_sampling",
    "flow_shift": "discrete_flow_shift", "shift": "discrete_flow_shift",
    "lr_warmup_ratio": "lr_warmup_steps", "lr_num_cycles": "lr_scheduler_num_cycles",
    "num_cycles": "lr_scheduler_num_cycles", "batch_size": "train_batch_size", "epochs": "max_train_epochs",
    "max_epochs": "max_train_epochs", "steps": "max_train_steps", "rank": "network_dim", "alpha": "network_alpha",
    "lr": "learning_rate",
}



def rule_for(name: str) -> Rule | None:
    """The rule of an option that is not a field (None: unknown).  Callers check TrainConfig fields first."""
    if name in RULES:
        return RULES[name]
    return None


def inert(rule: Rule, value: object) -> bool:
    """True when `value` asks for nothing beyond what anima-trainer does (kohya's off/unset for the option)."""
    # bool is an int in Python: only compare bools with bools and non-bools with non-bools
    return any(isinstance(value, bool) == isinstance(v, bool) and value == v for v in rule.inert)


def _is_true(value: object) -> bool:
    """kohya's store_true flags as a TOML or the command line give them (true, "true", 1 ...)."""
    return value is True or (not isinstance(value, bool) and str(value).strip().lower() in ("true", "1", "yes", "on"))


def rule_message(name: str, value: object, shown: str, settings: dict[str, object] | None = None
                 ) -> tuple[str, str]:
    """("notice" | "error", the line) for the option `name` set to `value`, written as the user wrote it; ("ok", "")
    for a value that works with kohya's meaning (kind "value").  `settings`: the other settings, for the rules that
    depend on them (huber_schedule only acts on a Huber loss, fp8_scaled needs fp8_base)."""
    rule = rule_for(name)
    assert rule is not None, name
    v = "true" if value is True else "false" if value is False else repr(value)
    loss = str((settings or {}).get("loss_type") or "l2")
    if name == "huber_schedule" and loss in ("l2", "l1"):  # what GUIs write (kohya's default "snr") with an l2 loss
        return "notice", f"{shown} = {v}: only used by the huber and smooth_l1 losses (loss_type is {loss}); no effect"
    if name == "fp8_scaled" and _is_true(value) and not _is_true((settings or {}).get("fp8_base")):
        return "error", ("fp8_scaled: needs fp8_base (fp8 storage is always scaled in anima-trainer); set fp8_base = "
                         "true, or remove fp8_scaled")
    if name == "save_model_as" and (settings or {}).get("training_mode") == "finetune" and str(
            value).strip().lower() not in rule.accepted + UNSET:
        return "notice", (f"{shown} = {v}: kohya's anima_train.py writes the fine-tuned DiT as .safetensors whatever "
                          "save_model_as says, and so does training_mode = \"finetune\" (the base file's layout, "
                          "which ComfyUI loads)")
    if rule.kind == "value":
        if str(value).strip().lower() in rule.accepted:
            return "ok", ""
        return "error", (f"{name}: {value!r} is not written by anima-trainer: {rule.text} (use {name} = "
                         f"\"{rule.accepted[0]}\")")
    if rule.kind == "error" and not any(isinstance(value, bool) == isinstance(a, bool) and value == a
                                        for a in rule.accepted):
        return "error", f"{shown} = {v}: {rule.text}"
    if inert(rule, value):
        return "notice", f"{shown} = {v}: already what anima-trainer does ({rule.text})"
    return "notice", f"{shown} = {v}: {rule.text}"


# Names only sd-scripts-anima uses: a config with one of them is an sd-scripts-anima config (its meanings and
# defaults apply, e.g. lr_scheduler_num_cycles counts cosine periods there).
SD_SCRIPTS_ANIMA_MARKERS = frozenset(
    n for n in SD_SCRIPTS_ANIMA_OPTIONS
    if n.startswith("anima_") or n in ("qwen", "t5_tokenizer_dir"))


def is_sd_scripts_anima(values: dict[str, object]) -> bool:
    """True for a config written for sd-scripts-anima: it sets one of its own option names or uses its LoKr
    module.  A name whose value is off/unset asks for nothing (a resolved kohya config lists every field, its
    `anima_resume_snapshot_strict = false` too) and does not count; `sd_scripts_anima_defaults = false` wins."""
    if values.get("sd_scripts_anima_defaults") in (False, "false", "False"):
        return False
    names = {k.split(":", 1)[-1] for k, v in values.items()  # command-line rule options carry a prefix
             if v not in (None, False, "", "false", "False")}
    return bool(names & SD_SCRIPTS_ANIMA_MARKERS) or any(
        str(values.get(k, "")).strip() in ("networks.lokr_anima",) for k in ("network_module",))
