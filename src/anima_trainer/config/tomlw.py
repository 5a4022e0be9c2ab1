"""A small TOML writer for the files anima-trainer generates (converted configs, drop-in configs).

Python's stdlib reads TOML but cannot write it, and the configs we write are simple: scalars, arrays of scalars,
tables and arrays of tables (`[[datasets]]` / `[[datasets.subsets]]`).  Every written document is read back
with `tomllib` by the callers' tests, so a value this writer cannot express fails loudly instead of drifting.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def toml_string(s: str) -> str:
    """A TOML basic string: JSON escapes are valid TOML escapes; DEL must be escaped in TOML, not in JSON."""
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(v: Any, where: str = "value") -> str:
    """One inline TOML value (bool, int, finite or infinite float, str, Path, list of those)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            raise ValueError(f"{where}: NaN cannot be written to a config file")
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, Path):
        return toml_string(str(v))
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x, where) for x in v) + "]"
    raise TypeError(f"{where}: cannot write a {type(v).__name__} to a config file")


def _key(k: str) -> str:
    bare = k and all(c.isalnum() or c in "_-" for c in k) and k.isascii()
    return k if bare else toml_string(k)


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _emit(table: dict[str, Any], path: list[str], out: list[str], header: str | None) -> None:
    scalars = [(k, v) for k, v in table.items() if not isinstance(v, dict) and not _is_table_array(v)]
    if header is not None:
        out.append(header)
    for k, v in scalars:
        if v is None:
            continue
        out.append(f"{_key(k)} = {toml_value(v, '.'.join([*path, k]))}")
    for k, v in table.items():
        sub = [*path, k]
        name = ".".join(_key(p) for p in sub)
        if isinstance(v, dict):
            out.append("")
            _emit(v, sub, out, f"[{name}]")
        elif _is_table_array(v):
            for item in v:
                out.append("")
                _emit(item, sub, out, f"[[{name}]]")


def dumps(doc: dict[str, Any], comment: str = "") -> str:
    """`doc` as TOML text; `comment` (any number of lines) goes first, each line prefixed with '# '.
    None values are left out (TOML has no null)."""
    out = [("# " + line).rstrip() for line in comment.splitlines()] if comment else []
    if out:
        out.append("")
    _emit(doc, [], out, None)
    text = "\n".join(out).strip("\n") + "\n"
    return text.replace("\n\n\n", "\n\n")
