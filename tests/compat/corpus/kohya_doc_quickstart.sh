# source: kohya-ss/sd-scripts docs/anima_train_network.md @ 063ef100648c016b6b4d804a6de6f5afab7ebd58, §4 "Example command"
# (the guide's command verbatim; paths replaced). Dataset: kohya_ss_dataset.dataset.toml.
accelerate launch --num_cpu_threads_per_process 1 anima_train_network.py \
  --pretrained_model_name_or_path="@DIT@" \
  --qwen3="@QWEN3@" \
  --vae="@VAE@" \
  --dataset_config="@DATASET_CONFIG@" \
  --output_dir="@OUTPUT_DIR@" \
  --output_name="my_anima_lora" \
  --save_model_as=safetensors \
  --network_module=networks.lora_anima \
  --network_dim=8 \
  --learning_rate=1e-4 \
  --optimizer_type="AdamW8bit" \
  --lr_scheduler="constant" \
  --timestep_sampling="sigmoid" \
  --discrete_flow_shift=1.0 \
  --max_train_epochs=10 \
  --save_every_n_epochs=1 \
  --mixed_precision="bf16" \
  --gradient_checkpointing \
  --cache_latents \
  --cache_text_encoder_outputs \
  --vae_chunk_size=64 \
  --vae_disable_cache
