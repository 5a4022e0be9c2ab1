# source: l1934332574-maker/Kohya-LoRA-Tool issue #2 "0.9.7 anima 训练无法启动"
#         (https://github.com/l1934332574-maker/Kohya-LoRA-Tool/issues/2): the command in the pasted
#         CalledProcessError (a kohya_ss-wrapper GUI launching sd-scripts). Written as the argument list it shows, one
#         argument a line. Paths replaced. The stored copy of the thread is cut off inside the --qwen3 argument, so
#         the list ends there; --vae (which the tool's full command must carry: kohya requires it) is added.
python
anima_train_network.py
--pretrained_model_name_or_path=@DIT@
--dataset_config=@DATASET_CONFIG@
--tokenizer_cache_dir=@TOKENIZER_CACHE@
--output_dir=@OUTPUT_DIR@
--output_name=character_lora
--logging_dir=@LOGGING_DIR@
--save_model_as=safetensors
--save_precision=bf16
--network_module=networks.lora_anima
--network_dim=32
--network_alpha=16
--learning_rate=7e-05
--network_train_unet_only
--qwen3=@QWEN3@
--vae=@VAE@
