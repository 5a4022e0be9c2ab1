"""safetensors files through the one write path (fileio.write_atomic): streamed, NaN/Inf refused as written.

Split from fileio.py so that the byte write path stays torch-free (the config layer uses it)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from anima_trainer.dtypes import SAFETENSORS_NAMES
from anima_trainer.fileio import write_all, write_atomic


class NonFiniteError(ValueError):
    """Tensors about to be written hold NaN/Inf: the file is not written (whatever had its name is unchanged)."""


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors holding NaN or Inf (one device read per device, not one per tensor)."""
    names = [k for k, t in tensors.items() if t.is_floating_point() or t.is_complex()]
    by_device: dict[torch.device, list[int]] = {}
    for i, name in enumerate(names):
        by_device.setdefault(tensors[name].device, []).append(i)
    bad = []
    for idx in by_device.values():
        flags = torch.stack([_all_finite(tensors[names[i]]) for i in idx]).tolist()
        bad += [names[i] for i, ok in zip(idx, flags, strict=True) if not ok]
    return sorted(bad)


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.itemsize == 1:  # float8: isfinite is not implemented for it everywhere
        t = t.float()
    return torch.isfinite(t).all()


def check_finite(tensors: Mapping[str, torch.Tensor], path: str | Path, what: str = "") -> None:
    """Raise NonFiniteError naming the file and the tensors that hold NaN/Inf."""
    bad = nonfinite_tensors(tensors)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(f"{what}{path}: not written, {len(bad)} tensor(s) hold NaN/Inf: {shown}")



def _write_safetensors(fd: int, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> None:
    """Stream `tensors` in the safetensors format to `fd` (no second in-memory copy of a multi-GB checkpoint,
    and no writer-owned temporary: safetensors' own save_file renames a `.tmpXXXXXX` of its own, mode 0600,
    over its target).  Layout as safetensors writes it: largest item size first, then by name, so every
    tensor's offset is aligned to its item size; header padded with spaces to 8 bytes."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata keys and values must be str")
    order = sorted(tensors, key=lambda k: (-tensors[k].dtype.itemsize, k))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in SAFETENSORS_NAMES:
            raise ValueError(f"tensor {name}: dtype {t.dtype} cannot be stored in safetensors")
        size = t.numel() * t.dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    write_all(fd, len(head).to_bytes(8, "little") + head)
    for name in order:
        t = tensors[name].detach()
        if t.numel():
            write_all(fd, t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)


def atomic_save(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None,
                *, require_finite: bool = True, what: str = "", check: Callable[[Path], None] | None = None) -> Path:
    """Write a safetensors file through the one write path.

    `tensors` are written as given (cast them to the file's dtype first): with `require_finite` (the default:
    networks, merged and converted checkpoints, cache entries) the check runs on exactly these tensors, so an
    fp32 value beyond fp16's range that became Inf in the cast is refused, and NonFiniteError names the file
    and the tensors; nothing is written.  Pass False only for a file that may legitimately hold NaN/Inf.
    `what` prefixes messages ("network file "); `check(tmp)` may refuse the written file before it takes
    `path`'s name (e.g. ComfyUI's key rules)."""
    path = Path(path)
    if require_finite:
        check_finite(tensors, path, what)
    return write_atomic(path, lambda fd: _write_safetensors(fd, tensors, metadata), what=what, check=check)
