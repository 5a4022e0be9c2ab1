"""Reading small text files (captions) whatever their encoding, and reporting the ones that were not UTF-8.

Decoding order (decision): UTF-8 (a BOM is dropped) -> UTF-16 when the file starts with a UTF-16 BOM
(Windows Notepad's "Unicode") -> cp1252 (Windows "ANSI", the usual non-UTF-8 caption) -> latin-1, which
maps every byte, so reading never fails.  A fallback can produce mojibake for other legacy encodings
(Shift-JIS, GBK, ...), so every file that needed one is logged and, while `collect_decode_notes()` is
active, recorded as (path, message) for the start-up report.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

log = logging.getLogger(__name__)

_NOTES: ContextVar[list[tuple[Path, str]] | None] = ContextVar("anima_trainer_decode_notes", default=None)


def decode_text(data: bytes) -> tuple[str, str]:
    """(text, encoding used)."""
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        pass
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            return data.decode("utf-16"), "utf-16"
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def read_text(path: Path) -> str:
    """The file's text; a non-UTF-8 file is decoded with the fallbacks above and reported."""
    text, encoding = decode_text(Path(path).read_bytes())
    if encoding != "utf-8":
        note = f"not valid UTF-8; decoded as {encoding} (check the text, re-save as UTF-8 to silence this)"
        log.debug("%s: %s", path, note)
        notes = _NOTES.get()
        if notes is not None:
            notes.append((Path(path), note))
        else:
            log.warning("%s: %s", path, note)
    return text


@contextmanager
def collect_decode_notes() -> Iterator[list[tuple[Path, str]]]:
    """Within the block, `read_text` appends (path, message) for each fallback-decoded file to the list
    yielded here (instead of logging one warning per file)."""
    notes: list[tuple[Path, str]] = []
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)
