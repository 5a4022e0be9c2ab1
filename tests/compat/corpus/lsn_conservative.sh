# launch: how lora-scripts-next starts sd-scripts for this template (issue #76: scripts/dev/anima_train_network.py
# --config_file <toml>), with the paths its Anima LoRA page supplies (schema mikazuki/schema/sd3-lora.ts field names).
# Harness-written: the template itself has no paths.
python scripts/dev/anima_train_network.py --config_file @CONFIG_FILE@ --pretrained_model_name_or_path @DIT@ --qwen3 @QWEN3@ --vae @VAE@ --train_data_dir @TRAIN_DATA_DIR@ --output_dir @OUTPUT_DIR@ --output_name conservative --logging_dir @LOGGING_DIR@
