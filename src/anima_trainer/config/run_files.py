"""Where a training run keeps the files that describe it, and reading them back: the run's seed, the event log
`<output_dir>/<output_name>.events.jsonl` and the resolved config `train_config.toml`.

Here, below everything that runs, because training writes these files (train/events.py, train/saving.py) and
evaluation reads them (`anima-trainer eval RUN_OUTPUT_DIR`) without importing the training code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESOLVED_CONFIG_NAME = "train_config.toml"
EVENTS_SUFFIX = ".events.jsonl"
DEFAULT_SEED = 42  # an unset `seed` (kohya's default too)


def run_seed(cfg: Any) -> int:
    """The run's seed: `seed`, or DEFAULT_SEED when unset (the same for train, cache, eval and the benchmarks)."""
    return cfg.seed if cfg.seed is not None else DEFAULT_SEED


def events_path(output_dir: str | Path, output_name: str) -> Path:
    """Where a run's event log lives: next to the network files it describes."""
    return Path(output_dir) / f"{output_name}{EVENTS_SUFFIX}"


def read_events(path: str | Path) -> list[dict]:
    """All complete events of a log, oldest first; a line torn by a crash is skipped, not fatal."""
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
