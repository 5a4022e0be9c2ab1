"""The run's event log and the resolved-config file: what happened, readable after a crash.

`<output_dir>/<output_name>.events.jsonl` gets one JSON object per line: `{"time", "run", "type", "step",
"epoch", ...}` for the config, start, step summaries, saves, alerts, validation, evaluation (the light metrics,
train/measurements.py), end and errors.  Every line is
flushed and fsync'd as it is written (a crash loses at most the line being written), the file is opened in append
mode (a resumed run appends under a new `run` id), and a torn last line left by a crash is terminated before the
next run appends, so every complete line always parses.

`write_resolved_config` writes the full, validated `TrainConfig` as a training TOML that `--config_file` reads
back into an equal config (paths made absolute so the file works from any folder; secrets left out).
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from anima_trainer.config.run_files import RESOLVED_CONFIG_NAME, events_path, read_events
from anima_trainer.config.tomlw import toml_value
from anima_trainer.fileio import SaveError, atomic_write_bytes

EVENT_TYPES = ("config", "start", "resume", "step", "save", "save_state", "alert", "validation", "evaluation",
               "sample", "end", "error", "notice")
# settings never written to the event log or a resolved config (they would leak into shared folders)
SECRET_FIELDS = ("wandb_api_key",)
# RESOLVED_CONFIG_NAME, events_path and read_events live in config/run_files.py (evaluation reads them too);
# imported here where the writers and their callers have always found them
__all__ = ["EVENT_TYPES", "RESOLVED_CONFIG_NAME", "SECRET_FIELDS", "EventLog", "config_for_log", "events_path",
           "read_events", "resolved_config_toml", "write_resolved_config"]


def _jsonable(value: Any) -> Any:
    """JSON-safe copy: paths → str, tensors → numbers/lists, non-finite floats → "nan"/"inf" strings (strict JSON
    has no NaN, and an event log that other tools cannot parse is useless)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return _jsonable(value.tolist())
    return str(value)


class EventLog:
    """Append-only JSON-lines log; a disabled log (path None, e.g. on non-main processes) accepts and drops
    everything so callers need no `if`."""

    def __init__(self, path: str | Path | None, *, run: str | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.run = run or datetime.now().strftime("%Y%m%d_%H%M%S")
        self._file = None
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a+b")  # noqa: SIM115 (kept open for the run; closed in close())
                self._file.seek(0, os.SEEK_END)
                if self._file.tell() > 0:
                    self._file.seek(-1, os.SEEK_END)
                    if self._file.read(1) != b"\n":  # a crash tore the last line: end it so ours start clean
                        self._file.seek(0, os.SEEK_END)
                        self._write_bytes(b"\n")
            except SaveError:
                raise
            except OSError as e:
                raise SaveError(self.path, e, what="the event log ") from e

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def _write_bytes(self, data: bytes) -> None:
        try:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:  # a full disk names the log, not just "[Errno 28]"
            raise SaveError(self.path, e, what="the event log ") from e

    def write(self, type: str, *, step: int | None = None, epoch: int | None = None, **fields: Any) -> dict:
        """Append one event and force it to disk; returns the record (also when disabled)."""
        if type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type!r}; expected one of {', '.join(EVENT_TYPES)}")
        record = {"time": datetime.now().astimezone().isoformat(timespec="milliseconds"), "run": self.run,
                  "type": type, "step": step, "epoch": epoch}
        clash = set(fields) & set(record)
        if clash:
            raise ValueError(f"event fields {sorted(clash)} are reserved")
        record.update(_jsonable(fields))
        if self._file is not None:
            line = json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"
            self._write_bytes(line.encode("utf-8"))
        return record

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:  # only bytes whose write already failed (and was reported) can still be pending
                pass

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- resolved config ------------------------------------------------------------------------------------------
def config_for_log(cfg: Any) -> dict[str, Any]:
    """The resolved settings as JSON-safe values, secrets removed (the `config` event, tracker hparams)."""
    data = cfg.model_dump(mode="json")
    for k in SECRET_FIELDS:
        data.pop(k, None)
    return data


def _toml_lines(cfg: Any, quoted: set[str]) -> list[str]:
    lines = []
    for name in type(cfg).model_fields:
        v = getattr(cfg, name)
        if name in SECRET_FIELDS or v is None:
            continue
        if isinstance(v, Path):
            v = str(v if v.is_absolute() else Path.cwd() / v)
        elif isinstance(v, dict):
            # kohya's `key=value` list form.  Non-string values are Python literals (repr round-trips them);
            # strings are written bare, or quoted for fields whose values are literal-evaluated (`quoted`)
            v = [f"{k}={x!r}" if name in quoted or not isinstance(x, str) else f"{k}={x}" for k, x in v.items()]
        lines.append(f"{name} = {toml_value(v, name)}")
    return lines


def _absolute_paths(cfg: Any) -> Any:
    return cfg.model_copy(update={n: Path.cwd() / v for n in type(cfg).model_fields
                                  if isinstance(v := getattr(cfg, n), Path) and not v.is_absolute()})


def resolved_config_toml(cfg: Any) -> str:
    """The config as a flat training TOML (canonical names, unset values omitted) that reads back into the same
    settings; checked by reading it back (a dict field that does not round-trip bare is written quoted)."""
    import tomllib

    expected, quoted = _absolute_paths(cfg), set()
    for _ in range(2):
        lines = _toml_lines(cfg, quoted)
        back = type(cfg).model_validate(tomllib.loads("\n".join(lines)))
        wrong = {n for n in type(cfg).model_fields if n not in SECRET_FIELDS
                 and getattr(back, n) != getattr(expected, n)}
        if not wrong:
            break
        quoted |= {n for n in wrong if isinstance(getattr(cfg, n), dict)}
    else:
        raise ValueError(f"settings {sorted(wrong)} cannot be written to a training TOML that reads back the same")
    head = ["# resolved anima-trainer settings: `anima-trainer train --config_file <this file>` repeats the run",
            f"# written {datetime.now().astimezone().isoformat(timespec='seconds')}", ""]
    return "\n".join(head + lines) + "\n"


def write_resolved_config(path: str | Path, cfg: Any) -> Path:
    """Atomically write `cfg` as a training TOML at `path` (a folder → `<folder>/train_config.toml`)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESOLVED_CONFIG_NAME
    return atomic_write_bytes(resolved_config_toml(cfg).encode("utf-8"), path)
