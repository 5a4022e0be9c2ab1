# source: kohya-ss/sd-scripts issue #2363 (https://github.com/kohya-ss/sd-scripts/issues/2363), the PowerShell command
# pasted in the description. Paths ($animaDit, $animaQwen3, $animaVae, "...", $outputDirectory) replaced; $context
# (the output name) -> "context". The stored copy of the post ends after `--optimizer_type ...` (the rest, starting
# `--optimiz...`, is cut off), so the command stops there. The optimizer is the user's own module in the working
# directory (customized_optimizers/; the harness provides a stand-in, see SOURCES.md).
accelerate launch `
--num_cpu_threads_per_process 1 `
".../sd-scripts/anima_train_network.py" `
--pretrained_model_name_or_path @DIT@ `
--qwen3 @QWEN3@ `
--vae @VAE@ `
--dataset_config "@DATASET_CONFIG@" `
--output_dir @OUTPUT_DIR@ `
--output_name context `
--save_model_as safetensors `
--save_precision bf16 `
--network_module networks.lora_anima `
--network_dim 64 `
--network_alpha 128 `
--network_dropout 0.1 `
--gradient_accumulation_steps 2 `
--learning_rate 5e-5 `
--network_args "train_llm_adapter=False" `
--optimizer_type "customized_optimizers.simplifiedademamix.SimplifiedAdEMAMix"
