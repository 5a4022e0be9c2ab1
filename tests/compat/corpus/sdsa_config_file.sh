# source: FHfanshu/sd-scripts-anima docs/anima_train_network.md @ 2808ddc78d4a0ace0f1c5617f68ecd35fa7caec8 (and README):
# "兼容模式：--config_file <train_args.toml>" -- the launch for a train-args file that names its own dataset_config
# (or carries the dataset options itself). Path replaced.
accelerate launch anima_train_network.py --config_file @CONFIG_FILE@
