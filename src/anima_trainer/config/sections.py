"""The training settings by section, in reading order: what `config-reference` (docs/config_reference.md) and the
docs follow.  Every TrainConfig field is in exactly one section (tests/test_config_reference.py checks it).

Why a table: the fields are declared by concern in the option-group modules (network_settings, output_settings,
...), but a reader looks for "how do I save", "how do I fit memory": these are the sections of the reference."""

from __future__ import annotations

SECTIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("model files", "the DiT, text encoder, VAE and tokenizers, and how missing tokenizers are fetched", tuple("""
        pretrained_model_name_or_path qwen3 vae llm_adapter_path qwen3_tokenizer_path t5_tokenizer_path
        auto_download_t5_tokenizer t5_tokenizer_repo_id t5_tokenizer_subfolder t5_tokenizer_modelscope_fallback
        t5_tokenizer_modelscope_repo_id t5_tokenizer_modelscope_revision t5_tokenizer_modelscope_subfolder
        t5_tokenizer_validate_strict tokenizer_cache_dir qwen_image_vae_2d vae_chunk_size vae_disable_cache
        """.split())),
    ("network", "what is trained: the adapter kind, its size, targets and starting weights, or the DiT itself",
     tuple("""
        training_mode trainable_patterns finetune_llm_adapter fsdp_sharding network_module network_dim network_alpha
        network_args network_weights network_dropout dim_from_weights
        network_train_unet_only network_train_text_encoder_only train_norm base_weights base_weights_multiplier
        scale_weight_norms
        """.split())),
    ("optimisation", "learning rates, optimizer, batch, precision, length of the run, the EMA of the weights",
     tuple("""
        learning_rate unet_lr text_encoder_lr self_attn_lr cross_attn_lr mlp_lr mod_lr llm_adapter_lr
        optimizer_type optimizer_args use_8bit_adam use_lion_optimizer max_grad_norm max_train_steps
        max_train_epochs train_batch_size gradient_accumulation_steps mixed_precision full_bf16 full_fp16 seed
        ema_decay ema_warmup ema_device
        """.split())),
    ("objective", "timesteps, noise and loss of the flow-matching objective", tuple("""
        timestep_sampling discrete_flow_shift sigmoid_scale weighting_scheme logit_mean logit_std mode_scale
        min_timestep max_timestep loss_type huber_c noise_offset noise_offset_random_strength adaptive_noise_scale
        multires_noise_iterations multires_noise_discount ip_noise_gamma ip_noise_gamma_random_strength masked_loss
        prior_loss_weight preservation_loss_weight preservation_prompts preservation_every_n_steps
        """.split())),
    ("schedule", "the learning-rate schedule", tuple("""
        lr_scheduler lr_warmup_steps lr_decay_steps lr_scheduler_num_cycles lr_scheduler_power
        lr_scheduler_min_lr_ratio lr_scheduler_timescale lr_scheduler_type lr_scheduler_args
        """.split())),
    ("data and caching", "the dataset, its loader and the caches of the frozen encoders", tuple("""
        dataset_config max_data_loader_n_workers strict_captions cache_latents cache_latents_to_disk
        cache_text_encoder_outputs cache_text_encoder_outputs_to_disk vae_batch_size text_encoder_batch_size
        caption_variants cache_llm_adapter_outputs
        """.split())),
    ("speed and memory", "levers that change speed or memory, not the result (docs/performance.md)", tuple("""
        vram_budget_gb gradient_checkpointing checkpoint_blocks checkpoint_mode cpu_offload_checkpointing
        blocks_to_swap fp8_base fp8_format fp8_compute attention_backend fuse_qkv fused_backward_pass optimizer_offload
        compile_blocks compile_mode compile_backend compile_fullgraph compile_cache_size_limit compile_cache_dir
        ddp_bucket_cap_mb
        torch_compile dynamo_backend
        """.split())),
    ("saving and resume", "the saved files, their metadata, training states and resuming", tuple("""
        output_dir output_name save_format save_precision save_every_n_steps save_every_n_epochs save_n_epoch_ratio
        save_last_n_steps save_last_n_epochs overwrite save_state save_state_on_train_end save_last_n_steps_state
        save_last_n_epochs_state resume resume_snapshot_strict resume_ignore_optimizer_mismatch initial_epoch
        initial_step skip_until_initial_step output_config training_comment no_metadata metadata_title
        metadata_author metadata_description metadata_license metadata_tags metadata_usage_hint metadata_thumbnail
        metadata_merged_from metadata_trigger_phrase metadata_preprocessor metadata_is_negative_embedding
        """.split())),
    ("logging and monitoring", "console, trackers, TensorBoard and the run's alerts", tuple("""
        logging_dir log_with log_prefix console_log_level console_log_file console_log_simple log_every_n_steps
        log_tracker_name log_tracker_config wandb_run_name wandb_api_key auto_start_tensorboard tensorboard_host
        tensorboard_port tensorboard_logdir monitor_memory monitor_alert_policy nonfinite_loss_policy
        max_consecutive_nonfinite loss_spike_ratio memory_warn_ratio
        """.split())),
    ("sampling and validation", ("preview images, the validation loss on held-out images and the light "
                                 "evaluation metrics during the run"), tuple("""
        sample_every_n_steps sample_every_n_epochs sample_prompts sample_at_first sample_use_ema validation_split
        validation_seed
        validate_every_n_steps validate_every_n_epochs max_validation_steps eval_every_n_steps eval_every_n_epochs
        eval_prompts eval_trigger
        """.split())),
    ("compatibility", ("kept so that kohya / sd-scripts-anima configs load: sd-scripts-anima's defaults, and "
                       "options that change nothing for Anima"), tuple("""
        sd_scripts_anima_defaults anima_seq_len anima_resume_snapshot_strict min_snr_gamma
        debiased_estimation_loss v_pred_like_loss scale_v_pred_loss_like_noise_pred
        """.split())),
)


def section_of(name: str) -> str:
    """The section title of a setting (KeyError for a name that is not a setting)."""
    for title, _, names in SECTIONS:
        if name in names:
            return title
    raise KeyError(name)
