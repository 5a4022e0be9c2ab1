"""Training settings: `TrainConfig` (kohya names and defaults) built from the command line and a kohya training
TOML by `parse_train_args`; every user mistake is a `ConfigError` naming the key or flag.

    train.py              TrainConfig: the option groups below composed, path normalisation, the cross-field check
    model_files.py        the DiT / text encoder / VAE files, tokenizer folders and their download sources
    save_settings.py      output folder and name, saves, training states, resume; the file-name limit
    network_settings.py   the network (module, rank, alpha, network_args, weights) and the options around it
    finetune_settings.py  the fine-tune mode (training_mode, trainable_patterns) and what it refuses
    optimisation_settings.py  learning rates, optimizer, LR schedule, run length, batch, precision, seed
    speed_memory_settings.py  checkpointing, block swap, fp8 storage, attention kernel, fused q/k/v, compile
    flow_settings.py      timestep sampling, weighting and loss of the flow-matching objective
    noise_settings.py     kohya's noise offset, multires noise, input perturbation, timestep range
    data_settings.py      the dataset TOML and the caches of the frozen encoders
    logging_settings.py   console, trackers, TensorBoard, the run's alerts
    sampling_settings.py  preview images and the validation loss
    text_encoder_settings.py, vae_settings.py, output_settings.py, sd_scripts_anima.py  kohya's and
                          sd-scripts-anima's later option groups (text-encoder training, VAE/compile, file
                          metadata and bookkeeping, sd-scripts-anima's defaults and notices)
    optimizer_rules.py, schedule_rules.py  rules between optimizer and schedule settings, schedule notices
    loader.py             command line + TOML → TrainConfig (kohya precedence, aliases, switches, file and line)
    kohya_options.py      every other kohya / sd-scripts-anima option: aliases, switches, notice/error rules
    unset.py              kohya's "" = unset, one pass;  sections.py  the settings by section (the reference)
    rules.py              torch-free rules shared with models/networks; key=value lists
    run_files.py          a run's seed, event log and resolved-config name (written by train, read by evaluation)
    errors.py, source_urls.py, output_config.py, root_schema.py, tomlw.py  messages, source URLs,
                          --output_config, root-style TOML detection, the TOML writer
"""

from anima_trainer.config.errors import ConfigError
from anima_trainer.config.loader import (
           build_train_parser,
           parse_train_args,
           read_train_toml,
)
from anima_trainer.config.train import TrainConfig, make_train_config

__all__ = ["ConfigError", "TrainConfig", "build_train_parser", "make_train_config", "parse_train_args",
           "read_train_toml"]
