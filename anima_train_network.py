"""Drop-in for kohya's `anima_train_network.py`: the same flags and TOML files, run by anima-trainer."""

import sys

from anima_trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
