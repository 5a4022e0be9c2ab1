# source: beautifulrem/sd-scripts docs/anima_lora_training_latest_research.md @ 666b29c3f889f44049d318d5cef959e577c78b58
# §3 "普通 LoRA 的共同基线" command, verbatim; paths replaced. Dataset: remi_baseline.dataset.toml (§6 of the same doc).
accelerate launch --num_cpu_threads_per_process 1 anima_train_network.py \
  --pretrained_model_name_or_path=@DIT@ \
  --qwen3=@QWEN3@ \
  --vae=@VAE@ \
  --dataset_config=@DATASET_CONFIG@ \
  --output_dir=@OUTPUT_DIR@ --output_name=anima_lora \
  --save_model_as=safetensors --save_precision=bf16 \
  --network_module=networks.lora_anima \
  --network_train_unet_only \
  --network_dim=32 --network_alpha=32 \
  --learning_rate=2e-5 \
  --optimizer_type=AdamW \
  --optimizer_args "betas=0.9,0.99" "weight_decay=0.01" "eps=1e-8" \
  --lr_scheduler=constant_with_warmup --lr_warmup_steps=100 \
  --gradient_accumulation_steps=4 \
  --max_grad_norm=1.0 \
  --timestep_sampling=sigmoid --sigmoid_scale=1.0 \
  --weighting_scheme=uniform --loss_type=l2 \
  --max_train_steps=1500 --save_every_n_steps=250 \
  --mixed_precision=bf16 --gradient_checkpointing \
  --cache_latents --cache_latents_to_disk \
  --cache_text_encoder_outputs --cache_text_encoder_outputs_to_disk \
  --qwen_image_vae_2d \
  --seed=42
