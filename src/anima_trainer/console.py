"""The console: log lines, their level, progress bars and the one-line error report of the command line.

Why one module: log lines and tqdm bars share the terminal.  A plain `StreamHandler` writes into the middle of a
bar's line, so every record goes through `tqdm.write`, which clears the bars, prints the line and redraws them.
The level (`--log_level` before the command, `console_log_level` in the training settings, or the environment
variable ANIMA_TRAINER_LOG_LEVEL) is set here; at INFO and above the HTTP libraries' per-request INFO lines
(httpx, urllib3, huggingface_hub, filelock) are hidden.  `TQDM_DISABLE=1` turns a bar off also when it is created
with an explicit `disable=` (tqdm itself only reads the variable for bars that leave `disable` at its default):
bars pass `disable=progress_disabled(...)`.

kohya's `console_log_simple` (message only) and `console_log_file` (log lines into a file instead of the console)
are applied by `apply_training_settings` once the training settings are read.

In a multi-process launch (RANK > 0) only warnings and errors are shown, prefixed with the rank, so the console
shows one copy of the run's progress.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm import tqdm

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LEVEL_ENV = "ANIMA_TRAINER_LOG_LEVEL"
# libraries that log one INFO line per HTTP request (downloads): shown only at DEBUG
NOISY_LIBRARIES = ("httpx", "httpcore", "urllib3", "huggingface_hub", "filelock", "modelscope")


class TqdmHandler(logging.Handler):
    """Writes records to the current sys.stderr through `tqdm.write`, so an active progress bar is redrawn below
    the line instead of being broken by it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def parse_level(value: str | int | None) -> int | None:
    """A level name (any case) or number → logging level; None/"" → None.  ValueError names the choices."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return value
    name = str(value).strip().upper()
    if name not in LEVELS:
        raise ValueError(f"log level: expected one of {', '.join(LEVELS)}, got {value!r}")
    return getattr(logging, name)


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def setup(level: str | int | None = None) -> int:
    """Install the console handler on the root logger (replacing an earlier one from this module) and set the
    level: `level`, else ANIMA_TRAINER_LOG_LEVEL, else INFO.  Returns the level in force."""
    lvl = parse_level(level)
    if lvl is None:
        try:
            lvl = parse_level(os.environ.get(LEVEL_ENV))
        except ValueError:
            lvl = None
    lvl = logging.INFO if lvl is None else lvl
    rank = _rank()
    root = logging.getLogger()
    _remove_handlers(root)
    handler = TqdmHandler()
    handler._anima_console = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(_prefix() + "%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    set_level(max(lvl, logging.WARNING) if rank > 0 else lvl)
    return root.level


def _prefix() -> str:
    rank = _rank()
    return f"[rank {rank}] " if rank > 0 else ""


def _remove_handlers(root: logging.Logger) -> None:
    for h in list(root.handlers):
        if getattr(h, "_anima_console", False):
            root.removeHandler(h)
            if isinstance(h, logging.FileHandler):
                h.close()


class SimpleFormatter(logging.Formatter):
    """kohya's console_log_simple: the message alone; warnings and errors keep their level word, so that they
    still stand out in a plain log."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__(prefix + "%(message)s")
        self._loud = logging.Formatter(prefix + "%(levelname)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return self._loud.format(record) if record.levelno >= logging.WARNING else super().format(record)


def apply_training_settings(level: str | None, *, simple: bool = False, log_file: str | os.PathLike | None = None
                            ) -> None:
    """kohya's console options from the training settings: `console_log_level` (the level), `console_log_simple`
    (plain lines: `SimpleFormatter`) and `console_log_file` (the lines go to that file instead of the console;
    appended, so an earlier run's log is kept).  The one-line error report and the progress bars stay on the
    console."""
    if level:
        set_level(level)
    if not simple and log_file is None:
        return
    root = logging.getLogger()
    formatter = SimpleFormatter(_prefix()) if simple else logging.Formatter(
        _prefix() + "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    if log_file is None:
        handlers = [h for h in root.handlers if getattr(h, "_anima_console", False)] or [_install(TqdmHandler())]
        for h in handlers:
            h.setFormatter(formatter)
        return
    path = os.fspath(os.path.expanduser(log_file))
    file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")  # opens now: a bad path fails at once
    _remove_handlers(root)
    _install(file_handler).setFormatter(formatter)


def _install(handler: logging.Handler) -> logging.Handler:
    handler._anima_console = True  # type: ignore[attr-defined]
    logging.getLogger().addHandler(handler)
    return handler


def set_level(level: str | int) -> None:
    """Change the console level (e.g. to the training settings' `console_log_level` once they are read)."""
    lvl = parse_level(level)
    assert lvl is not None
    logging.getLogger().setLevel(lvl)
    for name in NOISY_LIBRARIES:  # their per-request INFO lines only when DEBUG was asked for
        logging.getLogger(name).setLevel(logging.NOTSET if lvl <= logging.DEBUG else logging.WARNING)


def debugging() -> bool:
    """True when the console level is DEBUG: error reports then include the traceback."""
    return logging.getLogger().getEffectiveLevel() <= logging.DEBUG


def bars_disabled() -> bool:
    """TQDM_DISABLE set to a true value (1/true/yes/on): no progress bars at all."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


def progress_disabled(disable: bool | None = False) -> bool | None:
    """The `disable=` for a tqdm bar: True when TQDM_DISABLE asks for it, else `disable` as given (None lets tqdm
    turn the bar off when stderr is not a terminal)."""
    return True if bars_disabled() else disable


def describe_error(e: BaseException) -> str:
    """The text of a user error for its one `error:` line.  OSErrors lose Python's "[Errno N]" and say which path
    and, for a full disk or a missing permission, what to do; a RecursionError says the input is nested too
    deeply (a hostile or broken file: the places that parse files name the file themselves)."""
    if isinstance(e, RecursionError):
        return (f"an input is nested too deeply to be read ({e}); check the files given for this command "
                "(a TOML, JSON or safetensors header nested hundreds of levels deep is not a real config)")
    if isinstance(e, OSError) and e.errno is not None:
        import errno as errnos

        where = "".join(f" {p!r}" for p in (e.filename, e.filename2) if p is not None)
        # the OS's "[Errno N] text: 'path'", or the text of an OSError that says it itself (fileio.SaveError)
        text = f"{e.strerror}{':' if where else ''}{where}" if e.strerror else str(e)
        if e.errno == errnos.ENOSPC:
            text += " (the disk is full: free space there, or point output_dir / the cache at another disk)"
        elif e.errno in (errnos.EACCES, errnos.EPERM, errnos.EROFS):
            text += " (no permission for that path: fix its permissions or choose a path you own)"
        elif e.filename is not None and (e.errno == errnos.ENOTDIR or e.errno == errnos.EEXIST
                                         and os.path.isfile(e.filename)):
            text += " (a file stands where a folder is needed: remove it or choose another path)"
        return text
    return str(e) or type(e).__name__


def close_bars() -> None:
    """Close every open progress bar (an exception left it open), so that the error line is the last line and
    no bar is redrawn after it."""
    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001, S110 - a bar that cannot close must not hide the error
            pass
