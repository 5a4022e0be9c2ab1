"""Atomic output: every file we write appears whole or not at all, and never replaces a user's file unasked.

Every final file (network, merged/converted checkpoint, cache entry, PNG, TOML) goes through `write_atomic`:
temp file in the same folder (created 0o666 & ~umask, like any file the user makes), written, fsync'd, renamed
into place, folder fsync'd, so the promise holds across a power loss too.  safetensors writes (`atomic_save`)
refuse NaN/Inf by default, checked on the tensors exactly as written (after any dtype cast).  Temporaries are
named `.<final>.<pid>-<hex>.tmp`; `remove_stale_temporaries` clears those of killed writers.  Torch-free (the
config layer writes through it); tensor files (safetensors, finiteness) are anima_trainer/tensor_files.py."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path



class OutputExistsError(FileExistsError):
    """Refusing to overwrite a file the user did not ask us to replace."""


class SaveError(OSError):
    """A write failed (disk full, no permission, ...): the message names what was being written and why (the
    OS's own write errors name no file, or only the temporary).  Writes are atomic, so whatever had that name
    before is unchanged."""

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


# ----------------------------------------------------------------------------------------- temporaries --
# `.<final name>.<writer pid>-<8 hex>.tmp` beside the final file: hidden, names its writer, never a user's name.
_TEMP_RE = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")
_TEMP_NAME_HEAD = 200
STALE_TEMP_AGE_S = 24 * 3600  # a live pid this old is a reused pid: no write of ours takes a day


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new temp file beside `path`, opened for writing.  Created by os.open with mode 0o666 so the kernel
    applies the umask (and any default ACL) as for any file the user makes; mkstemp's 0600 would lock out a
    ComfyUI running as another user."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        # the final name's head only: the temporary's name must fit NAME_MAX (255) whenever the final one does
        tmp = path.with_name(f".{path.name[:_TEMP_NAME_HEAD]}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill would terminate it there; only the age rule applies
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    return True


def remove_stale_temporaries(folder: str | Path, final_prefix: str = "") -> list[Path]:
    """Remove our temporaries in `folder` left by a killed writer (its pid is gone, or the file is a day old),
    only those of final names starting with `final_prefix` when given.

    Only names `_create_temp` makes are touched, never a user's file; a temp of a live process (another run
    or rank writing into the same cache folder now) is left alone.  Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None or not m["final"].startswith(final_prefix):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            old = now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_AGE_S
            if old or not _pid_alive(int(m["pid"])):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


# --------------------------------------------------------------------------------------------- finiteness --
# ----------------------------------------------------------------------------------------- the write path --
def write_atomic(path: str | Path, write: Callable[[int], None], *, what: str = "",
                  check: Callable[[Path], None] | None = None) -> Path:
    """The one write path of every final file: a temp file in the target folder (mode from the umask),
    `write(fd)` fills it, fsync, `check(tmp)` may still refuse it, rename onto `path`, fsync the folder.

    A crash at any point leaves `path` as it was (or the new file whole, after a power loss too).  OS and
    write failures become SaveError naming `path`; what `check` raises passes through unchanged."""
    path = Path(path)
    tmp: Path | None = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = _create_temp(path)
            try:
                write(fd)
            finally:
                os.close(fd)
            fsync_file(tmp)
        except OSError as e:
            raise SaveError(path, e, what) from e
        if check is not None:
            check(tmp)
        try:
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            raise SaveError(path, e, what) from e
        fsync_dir(path.parent)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def move_into_place(src: str | Path, dest: str | Path) -> Path:
    """The write path's last steps for a file written in place elsewhere (a resumable download's `.part`):
    fsync it, rename it onto `dest` (same folder or file system), fsync the folder."""
    fsync_file(src)
    os.replace(src, dest)
    fsync_dir(Path(dest).parent)
    return Path(dest)


def replace_folder(src: str | Path, folder: str | Path, aside: str | Path | None = None) -> Path:
    """Put the complete folder `src` (a state written beside its final name) at `folder`, then fsync the parent
    so the rename survives a power loss too.

    A folder already at `folder` is first renamed to `aside` (required then: a rename cannot replace a non-empty
    folder), put back if `src` cannot take its name, and removed once it has; a crash between the two renames
    leaves it at `aside` for the caller's start-up clean-up to put back."""
    src, folder = Path(src), Path(folder)
    old = None
    if folder.exists():
        if aside is None:
            raise FileExistsError(errno.EEXIST, "a folder is in the way and no aside name was given", str(folder))
        old = Path(aside)
        os.replace(folder, old)
    try:
        os.replace(src, folder)
    except OSError:
        if old is not None:
            os.replace(old, folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(folder.parent)
    return folder


def write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def atomic_write_bytes(data: bytes, path: str | Path, *, what: str = "") -> Path:
    """Write bytes (PNG, TOML, JSON, text) through the one write path."""
    return write_atomic(path, lambda fd: write_all(fd, data), what=what)
