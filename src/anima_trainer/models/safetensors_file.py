"""The safetensors file format itself: a header checked before any tensor is read, and the errors a model file
raises.  The lowest layer of models/: model_files.py (what a file is) and diffusers_layout.py (what a folder is)
both build on it; neither is imported here.

Only safetensors are ever deserialised (headers are JSON, data is mmapped), so a malicious file can't run code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# Bytes per element of every dtype the safetensors format names and torch can hold; anything else is refused
# while reading the header, before a tensor is touched.
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class ModelFileError(ValueError):
    """A file can't be read as a model (missing, not safetensors, bad keys)."""


class WrongModelFileError(ModelFileError):
    """The user passed a file of the wrong kind to a flag."""



def read_header(path: str | Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """{key: (dtype, shape)} and metadata, from the safetensors JSON header only (no tensor data)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a .safetensors file")
    if not path.is_file():  # a FIFO would block the read forever
        raise ModelFileError(f"{path} is not a regular file (a pipe or device?); pass a .safetensors file")
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the `with f:` below
    except OSError as e:
        raise ModelFileError(f"{path} cannot be read: {e.strerror or e}") from None
    with f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path} is not a safetensors file (too short: {len(head)} bytes)")
        size = int.from_bytes(head, "little")
        file_size = path.stat().st_size
        if size <= 0 or size > 100_000_000:
            raise ModelFileError(f"{path} is not a safetensors file (only .safetensors weights are loaded; "
                                 "convert .ckpt/.pt/.bin files, which could run code when unpickled)")
        if 8 + size > file_size:
            raise ModelFileError(f"{path}: header length {size} points past the end of the file ({file_size} "
                                 "bytes): the file is truncated (download or copy it again) or not a safetensors file")
        header = parse_json(f.read(size), f"{path} is not a safetensors file: bad header")
    return _parse_header(path, header, file_size - 8 - size)


def parse_json(text: str | bytes, bad: str) -> object:
    """`json.loads` for text from a file: any decoding failure, including nesting deep enough to exhaust the
    recursion limit (`[[[[...` 100000 levels), becomes one ModelFileError starting with `bad`."""
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{bad} ({e})") from None
    except RecursionError:
        raise ModelFileError(f"{bad} (JSON nested too deeply)") from None


def _parse_header(path: Path, header: object, data_size: int
                  ) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """Check the decoded JSON header's structure and that the file holds exactly the tensor data it describes."""
    bad = f"{path} is not a safetensors file: bad header"
    if not isinstance(header, dict):
        raise ModelFileError(f"{bad} (a JSON {type(header).__name__}, not an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise ModelFileError(f"{bad} (__metadata__ is not an object)")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ModelFileError(f"{bad} (__metadata__ values must be strings)")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans: list[tuple[int, int, str]] = []
    for k, v in header.items():
        entry = v if isinstance(v, dict) else {}
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(dtype, str) and isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                and all(type(d) is int and d >= 0 for d in [*shape, *offsets]) and offsets[0] <= offsets[1]):
            raise ModelFileError(f"{bad} (tensor {k!r} needs dtype, shape and data_offsets, got {str(v)[:80]})")
        if dtype not in DTYPE_SIZES:
            raise ModelFileError(f"{path}: tensor {k[:80]!r} declares the unknown dtype {dtype[:40]!r} (known: "
                                 f"{', '.join(DTYPE_SIZES)}); the file is damaged or from a newer format — nothing "
                                 "was loaded from it")
        numel = math.prod(shape)
        if numel * DTYPE_SIZES[dtype] != offsets[1] - offsets[0]:
            raise ModelFileError(f"{path} is corrupt: tensor {k[:80]!r} ({dtype}, shape {shape}) needs "
                                 f"{numel * DTYPE_SIZES[dtype]} bytes but its data_offsets {offsets} span "
                                 f"{offsets[1] - offsets[0]}; get the file again")
        out[k] = (dtype, tuple(shape))
        spans.append((offsets[0], offsets[1], k))
    end = 0
    for start, stop, k in sorted(spans):
        if start != end:  # safetensors packs tensors back to back: a gap or an overlap is a forged/broken header
            raise ModelFileError(f"{path} is corrupt: tensor {k[:80]!r} starts at byte {start} of the data, "
                                 f"expected {end} ({'overlapping another tensor' if start < end else 'a gap'}); "
                                 "get the file again")
        end = stop
    if end > data_size:
        raise ModelFileError(f"{path} is truncated: its header describes {end} bytes of tensor data, the file holds "
                             f"{data_size} (an interrupted download or copy? get the file again)")
    if end < data_size:
        raise ModelFileError(f"{path} is corrupt: {data_size - end} bytes follow the {end} bytes of tensor data its "
                             "header describes (not a valid safetensors file; get the file again)")
    return out, meta


