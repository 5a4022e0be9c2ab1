"""Drop-in for kohya-ss/sd-scripts' `anima_train_network.py`: the same flags and TOML files, run by anima-trainer.

    accelerate launch anima_train_network.py --config_file config_lora.toml [kohya flags]
    python anima_train_network.py --config_file root_style.toml     # a root-style Anima_Trainer config

GUIs that launch sd-scripts (kohya_ss, lora-scripts) can point at this file.  What kohya reads differently from
`anima-trainer train` (the dataset on the command line, `lr_scheduler_num_cycles`, LyCORIS arguments, options
sd-scripts ignores for Anima, root-style files) is translated by `anima_trainer.config.dropin`, which prints a
notice for each translation and writes what it generated under `<output_dir>/<output_name>_config/`.  Anything
anima-trainer does not support stops with a message naming the option (docs/migration.md).
"""

import sys


def main(argv: list[str] | None = None) -> int:
    """Translate kohya's command line, print the notices, then run `anima-trainer train` with the result."""
    from anima_trainer.cli import main as cli_main
    from anima_trainer.config.dropin import translate_kohya_argv
    from anima_trainer.config.errors import ConfigError

    try:
        args, notices = translate_kohya_argv(list(sys.argv[1:] if argv is None else argv))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in notices:
        print(f"anima_train_network: {line}", file=sys.stderr)
    return cli_main(["train", *args])


if __name__ == "__main__":
    sys.exit(main())
