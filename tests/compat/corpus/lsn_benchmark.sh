# source: wochenlong/lora-scripts-next issue #76 (https://github.com/wochenlong/lora-scripts-next/issues/76), maintainer's
# answer: "等价底层入口是: python scripts/dev/anima_train_network.py --config_file docs/examples/anima-lora-benchmark-kohya.toml".
# Only the script and config paths replaced.
python scripts/dev/anima_train_network.py --config_file @CONFIG_FILE@
