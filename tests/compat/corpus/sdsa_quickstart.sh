# source: FHfanshu/sd-scripts-anima docs/anima_train_network.md, "2. 最小启动命令" of the compatible-mode version (the
# version indexed without commit; @2808ddc78d4a0ace0f1c5617f68ecd35fa7caec8 documents the single-file form). Paths replaced.
accelerate launch anima_train_network.py --config_file @CONFIG_FILE@ --dataset_config @DATASET_CONFIG@
