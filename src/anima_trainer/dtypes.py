"""Dtype names, one table each: the precision names users write and the names the safetensors format uses.

Every module that turns a name into a torch dtype (or back) reads these tables, so "bf16" means the same in
`--dtype`, `save_precision`, `mixed_precision`, the memory estimate and a merged file's dtype.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# The precisions a user picks (`--dtype`, `--save_precision`, `save_precision`).
PRECISIONS = ("bf16", "fp16", "fp32")
# Every precision name we accept: the three above, `mixed_precision`'s "no" (fp32 weights) and kohya's
# `save_precision = "float"`.
PRECISION_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                                            "no": torch.float32, "float": torch.float32}


def precision_name(name: str) -> str:
    """The canonical precision ("bf16", "fp16" or "fp32") of any accepted name ("no" and "float" are fp32)."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[PRECISION_DTYPES[name]]


# safetensors dtype names (the format's spec); optional ones only where this torch has them
SAFETENSORS_NAMES: dict[torch.dtype, str] = {getattr(torch, t): n for t, n in (
    ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"), ("int64", "I64"),
    ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint8", "U8"), ("bool", "BOOL"),
    ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"), ("complex64", "C64"), ("uint16", "U16"), ("uint32", "U32"),
    ("uint64", "U64")) if hasattr(torch, t)}
# the floating dtypes a model file's weights are computed in (a merge loads and rewrites these; fp8 and
# integer tensors are copied as they are)
FLOAT_FILE_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                                             "F64": torch.float64}


def dominant_float_dtype(names: Iterable[str]) -> torch.dtype:
    """The most common of `FLOAT_FILE_DTYPES` among safetensors dtype `names` (the first seen on a tie; fp32 when
    there is none): the dtype a file is loaded in to be patched and written back in its own dtypes."""
    counts: dict[str, int] = {}
    for name in names:
        if name in FLOAT_FILE_DTYPES:
            counts[name] = counts.get(name, 0) + 1
    return FLOAT_FILE_DTYPES[max(counts, key=counts.__getitem__)] if counts else torch.float32
