"""One run per `output_dir`/`output_name`: a lock file taken before the run writes anything.

Two runs writing the same names would overwrite each other's network files, states and event log, and the
start-up clean-up of one would delete the other's half-written state. The lock is the hidden file
`<output_dir>/.<output_name>.lock` holding the holder's pid, host and start time, created with O_EXCL (atomic
on local filesystems). A lock left by a process that is no longer alive on this host (kill -9, power cut) is
recovered with a log line; a live holder (or one on another host, which cannot be checked) is an error naming
the holder, the lock file and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from anima_trainer.config import ConfigError

log = logging.getLogger(__name__)


def lock_path(output_dir: str | Path, output_name: str) -> Path:
    return Path(output_dir) / f".{output_name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def _read_holder(path: Path) -> dict | None:
    """The holder recorded in a lock file, or None when it cannot be read (being written, damaged)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int) or not isinstance(data.get("host"), str):
        return None
    return data


class RunLock:
    """`with RunLock(output_dir, output_name):` — held for the whole run, released on any exit."""

    def __init__(self, output_dir: str | Path, output_name: str) -> None:
        self.path = lock_path(output_dir, output_name)
        self.output_name = output_name
        self.held = False
        self._token = ""

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming the live holder (a dead holder's lock is taken over)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "output_name": self.output_name}
        data = json.dumps(me).encode()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._recover_or_refuse()
                continue
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.held, self._token = True, data.decode()
            return
        raise ConfigError(f"output_name {self.output_name!r}: could not take the run lock {self.path} (another "
                          "run keeps taking it); make sure only one run uses this output_name")

    def _recover_or_refuse(self) -> None:
        holder = _read_holder(self.path)
        host = socket.gethostname()
        if holder is None:  # another run is writing it this instant, or it is damaged: look again
            time.sleep(0.2)
            holder = _read_holder(self.path)
            if holder is None:
                if self.path.exists():
                    log.warning("run lock %s is unreadable; taking it over", self.path)
                    self.path.unlink(missing_ok=True)
                return
        pid, where = holder["pid"], holder["host"]
        if where == host and not _alive(pid):
            log.warning("run lock %s was left by process %d on %s, which is no longer running (killed?); "
                        "taking it over", self.path, pid, where)
            self.path.unlink(missing_ok=True)
            return
        raise ConfigError(
            f"output_name {self.output_name!r} in {self.path.parent} is in use by another run (pid {pid} on {where}, "
            f"started {holder.get('started', '?')}; lock file {self.path}): wait for it to end, or use another "
            "output_name or output_dir; if that process is gone (another machine), delete the lock file")

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if not self.held:
            return
        self.held = False
        try:
            if self.path.read_text(encoding="utf-8") == self._token:
                self.path.unlink()
        except OSError:
            pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
