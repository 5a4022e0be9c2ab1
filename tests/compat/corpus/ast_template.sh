# launch: Anima-Standalone-Trainer merges this template with its Global Settings (model paths) and a generated
# dataset.toml, then runs sd-scripts' anima_train_network.py (issue #15,
# https://github.com/gazingstars123/Anima-Standalone-Trainer/issues/15: "Loading settings from ...\_merged_config.toml",
# "Loading dataset config from ...\dataset.toml"). Harness-written: the model paths, dataset and output folder go on
# the command line; the dataset is the harness's own (harness.dataset.toml). --logging_dir too: the template sets
# log_with = "tensorboard", for which kohya requires a logging_dir, so the launcher must supply one.
accelerate launch anima_train_network.py --config_file @CONFIG_FILE@ --pretrained_model_name_or_path @DIT@ --qwen3 @QWEN3@ --vae @VAE@ --dataset_config @DATASET_CONFIG@ --output_dir @OUTPUT_DIR@ --logging_dir @LOGGING_DIR@
