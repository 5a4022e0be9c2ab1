"""The order of TrainConfig's fields is part of its surface: it is the order of `anima-trainer train --help`, of
output_config files and of error messages.  The fields are declared in option-group mixins (config/*_settings.py,
model_files.py, sd_scripts_anima.py) composed in TrainConfig's bases, so a moved field or a reordered base would
change it silently; this pins it (a new field is added here where it belongs)."""

from __future__ import annotations

from anima_trainer.config import TrainConfig, build_train_parser

FIELD_ORDER = """
    save_format training_comment no_metadata metadata_title metadata_author metadata_description metadata_license
    metadata_tags metadata_usage_hint metadata_thumbnail metadata_merged_from metadata_trigger_phrase
    metadata_preprocessor metadata_is_negative_embedding output_config save_n_epoch_ratio initial_epoch
    initial_step skip_until_initial_step console_log_file console_log_simple tokenizer_cache_dir strict_captions
    sd_scripts_anima_defaults train_norm anima_seq_len resume_ignore_optimizer_mismatch
    anima_resume_snapshot_strict noise_offset noise_offset_random_strength adaptive_noise_scale
    multires_noise_iterations multires_noise_discount ip_noise_gamma ip_noise_gamma_random_strength min_timestep
    max_timestep min_snr_gamma debiased_estimation_loss v_pred_like_loss scale_v_pred_loss_like_noise_pred
    qwen_image_vae_2d vae_chunk_size vae_disable_cache masked_loss torch_compile dynamo_backend
    network_train_unet_only network_train_text_encoder_only text_encoder_lr scale_weight_norms base_weights
    base_weights_multiplier self_attn_lr cross_attn_lr mlp_lr mod_lr llm_adapter_lr full_bf16 full_fp16
    pretrained_model_name_or_path qwen3 vae llm_adapter_path qwen3_tokenizer_path t5_tokenizer_path
    auto_download_t5_tokenizer t5_tokenizer_repo_id t5_tokenizer_subfolder t5_tokenizer_modelscope_fallback
    t5_tokenizer_modelscope_repo_id t5_tokenizer_modelscope_revision t5_tokenizer_modelscope_subfolder
    t5_tokenizer_validate_strict output_dir output_name save_precision save_every_n_steps save_every_n_epochs
    save_last_n_steps save_last_n_epochs overwrite save_state save_state_on_train_end save_last_n_steps_state
    save_last_n_epochs_state resume vram_budget_gb resume_snapshot_strict network_module network_dim network_alpha
    network_args network_weights network_dropout dim_from_weights training_mode trainable_patterns
    finetune_llm_adapter fsdp_sharding fused_backward_pass optimizer_offload learning_rate unet_lr optimizer_type
    optimizer_args use_8bit_adam use_lion_optimizer lr_scheduler lr_warmup_steps lr_decay_steps
    lr_scheduler_num_cycles lr_scheduler_power lr_scheduler_min_lr_ratio lr_scheduler_timescale lr_scheduler_type
    lr_scheduler_args max_grad_norm max_train_steps max_train_epochs train_batch_size gradient_accumulation_steps
    mixed_precision seed ema_decay ema_warmup ema_device gradient_checkpointing checkpoint_blocks checkpoint_mode
    cpu_offload_checkpointing
    blocks_to_swap fp8_base fp8_format fp8_compute max_data_loader_n_workers attention_backend fuse_qkv compile_blocks
    compile_mode compile_backend compile_fullgraph compile_cache_size_limit compile_cache_dir ddp_bucket_cap_mb
    timestep_sampling discrete_flow_shift
    sigmoid_scale weighting_scheme logit_mean logit_std mode_scale loss_type huber_c preservation_loss_weight
    preservation_prompts preservation_every_n_steps dataset_config logging_dir
    log_with log_prefix console_log_level log_every_n_steps log_tracker_name log_tracker_config wandb_run_name
    wandb_api_key auto_start_tensorboard tensorboard_host tensorboard_port tensorboard_logdir monitor_memory
    monitor_alert_policy nonfinite_loss_policy max_consecutive_nonfinite loss_spike_ratio memory_warn_ratio
    sample_every_n_steps sample_every_n_epochs sample_prompts sample_at_first sample_use_ema validation_split
    validation_seed
    validate_every_n_steps validate_every_n_epochs max_validation_steps eval_every_n_steps eval_every_n_epochs
    eval_prompts eval_trigger cache_latents cache_latents_to_disk
    cache_text_encoder_outputs cache_text_encoder_outputs_to_disk vae_batch_size text_encoder_batch_size
    caption_variants prior_loss_weight cache_llm_adapter_outputs
""".split()


def test_field_order_is_pinned():
    assert list(TrainConfig.model_fields) == FIELD_ORDER


def test_help_lists_the_fields_in_that_order():
    flags = [a.dest for a in build_train_parser()._actions if a.option_strings and a.dest in TrainConfig.model_fields
             and not a.option_strings[0].startswith("--no-")]
    assert flags == FIELD_ORDER
