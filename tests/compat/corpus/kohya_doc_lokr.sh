# source: kohya-ss/sd-scripts docs/loha_lokr.md @ 62db7eb2055cedea66dd32f8e32d39e768f833f4, "LoKr (SDXL)" command,
# with the page's instruction applied: "For Anima, replace sdxl_train_network.py with anima_train_network.py and use the
# appropriate model path and options" -> script name replaced, --qwen3/--vae (Anima's required model paths) added.
# and the LoKr-specific option from the same page: --network_args "factor=4".
# Dataset: kohya_ss_dataset.dataset.toml.
accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16 anima_train_network.py \
    --pretrained_model_name_or_path @DIT@ \
    --qwen3 @QWEN3@ --vae @VAE@ \
    --dataset_config @DATASET_CONFIG@ \
    --mixed_precision bf16 --fp8_base \
    --optimizer_type adamw8bit --learning_rate 2e-4 --gradient_checkpointing \
    --network_module networks.lokr --network_dim 32 --network_alpha 16 \
    --max_train_epochs 16 --save_every_n_epochs 1 \
    --output_dir @OUTPUT_DIR@ --output_name my-lokr \
    --network_args "factor=4"
