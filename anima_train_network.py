"""Drop-in for kohya-ss/sd-scripts' `anima_train_network.py`: the same flags and TOML files, run by anima-trainer.

    accelerate launch anima_train_network.py --config_file config_lora.toml [kohya flags]
    python anima_train_network.py --config_file root_style.toml     # a root-style Anima_Trainer config

GUIs that launch sd-scripts (kohya_ss, lora-scripts) can point at this file.  What `anima-trainer train` reads
differently (the dataset on the command line, LyCORIS arguments, root-style files) is translated by
`anima_trainer.compat.dropin`, which prints a notice for each translation and writes what it generated under
`<output_dir>/<output_name>_config/`.  Every other kohya option is judged by `anima-trainer train` itself: an
option without meaning for Anima prints one notice, one that cannot be honoured stops with a message naming
the option, your file and line (docs/migration.md, "Every option").
"""

import sys

HELP_DESCRIPTION = ("Drop-in for kohya-ss/sd-scripts' anima_train_network.py: kohya's flags and TOML files (and "
                    "root-style Anima_Trainer configs), trained by anima-trainer.  The options below are "
                    "`anima-trainer train`'s; the ones after them are translated first.")


def _run(argv: list[str]) -> int:
    from anima_trainer.cli import run_kohya_script

    return run_kohya_script(argv, prog="anima_train_network.py", description=HELP_DESCRIPTION)


def main(argv: list[str] | None = None) -> int:
    """Translate kohya's command line, print the notices, then run `anima-trainer train` with the result; errors
    as `anima-trainer` reports them (one line, exit 2 for a user's mistake; `--debug` for the traceback)."""
    from anima_trainer.cli import guarded

    return guarded(_run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
