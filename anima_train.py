"""Drop-in for kohya-ss/sd-scripts' `anima_train.py` (the full fine-tune): the same flags and TOML files, run by
anima-trainer in its fine-tune mode (`training_mode = "finetune"`, docs/training.md "Fine-tuning").

    accelerate launch anima_train.py --config_file config_finetune.toml [kohya flags]

It is `anima_train_network.py` with the fine-tune mode set: the same translation of what kohya reads differently
(the dataset on the command line, root-style files; anima_trainer.compat.dropin), the same judging of every other
option by `anima-trainer train` (one notice for an option without meaning, an error naming the option, your file
and line for one that cannot be honoured).  Which DiT parameters train: `trainable_patterns` (default: the whole
DiT; the LLM adapter with `finetune_llm_adapter = true` or an `llm_adapter_lr` above 0); kohya's component rates
`self_attn_lr`, `cross_attn_lr`, `mlp_lr`, `mod_lr`, `llm_adapter_lr` apply.  Every save is a whole DiT checkpoint
ComfyUI loads as a diffusion model, always .safetensors (as kohya's).  Differences: docs/migration.md.
"""

import sys

HELP_DESCRIPTION = ("Drop-in for kohya-ss/sd-scripts' anima_train.py (full fine-tune): kohya's flags and TOML files, "
                    "trained by anima-trainer with training_mode = \"finetune\".  The options below are "
                    "`anima-trainer train`'s; the ones after them are translated first.")


def _run(argv: list[str]) -> int:
    from anima_trainer.cli import run_kohya_script
    from anima_trainer.compat.dropin import FINETUNE_ARGS

    return run_kohya_script(argv, prog="anima_train.py", description=HELP_DESCRIPTION, extra=FINETUNE_ARGS)


def main(argv: list[str] | None = None) -> int:
    """Translate kohya's command line, print the notices, then run `anima-trainer train` in the fine-tune mode;
    errors as `anima-trainer` reports them (one line, exit 2 for a user's mistake; `--debug` for the traceback)."""
    from anima_trainer.cli import guarded

    return guarded(_run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
