"""`python -m anima_trainer <command> ...`: the `anima-trainer` command, also what launchers start
(`accelerate launch --multi_gpu --num_processes N -m anima_trainer train ...`, `torchrun ... -m anima_trainer`).

In a multi-process launch only the main process (RANK 0) logs at INFO; the others log warnings and errors,
prefixed with their rank, so the console shows one copy of the run's progress.
"""

from __future__ import annotations

import os
import sys

from anima_trainer import console
from anima_trainer.cli import main as cli_main


def _quiet_other_ranks() -> None:
    try:
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        rank = 0
    if rank > 0:  # early (imports log too); console.setup prefixes the rank and keeps ranks > 0 at WARNING, and
        # cli.main's setup replaces this handler instead of adding a second one
        console.setup()


def main() -> int:
    _quiet_other_ranks()
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
