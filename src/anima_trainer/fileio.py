"""Atomic output: every file we write appears whole or not at all, and never replaces a user's file unasked."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file


class OutputExistsError(FileExistsError):
    """Refusing to overwrite a file the user did not ask us to replace."""


class SaveError(OSError):
    """A write failed (disk full, no permission, ...): the message names what was being written and why (the
    OS's own write errors name no file; safetensors' name its temporary).  Writes are atomic, so whatever had
    that name before is unchanged."""

    def __init__(self, path: str | Path, cause: BaseException, what: str = "") -> None:
        self.reason = getattr(cause, "reason", None) or (
            cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause))
        super().__init__(f"could not write {what}{path}: {self.reason}")
        self.errno = getattr(cause, "errno", None)
        self.path = Path(path)


def fsync_file(path: str | Path) -> None:
    """Force a written file's bytes to disk (a rename alone survives a crash, not a power loss)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: str | Path) -> None:
    """Force a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(path: str | Path, overwrite: bool) -> Path:
    """Raise OutputExistsError if `path` exists and overwriting was not asked for."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite (or choose another name) to replace it")
    return path


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors write to a temp file in the same folder, then rename: no half-written file ever shows."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        raise SaveError(path, e) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(data: bytes, path: str | Path) -> Path:
    """Write bytes via temp file + rename in the target folder."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        raise SaveError(path, e) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path
