"""Reading what a failed command printed, the way a user reads it."""

from __future__ import annotations


def one_error_line(err: str) -> str:
    """The stderr of a failed or stopped command: no traceback, and its last line says why (INFO lines and the
    progress bar may come before it; no other line is an `error:` line)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert not [line for line in lines[:-1] if line.startswith("error:")], lines
    return lines[-1]
