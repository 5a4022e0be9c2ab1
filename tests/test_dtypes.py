"""Issue 16 item 6: one table of dtype names (anima_trainer/dtypes.py) for every name → dtype lookup."""

from __future__ import annotations

import torch

from anima_trainer.dtypes import (FLOAT_FILE_DTYPES, PRECISION_DTYPES, PRECISIONS, SAFETENSORS_NAMES,
                                  dominant_float_dtype, precision_name)


def test_precision_names_mean_the_same_everywhere():
    assert [PRECISION_DTYPES[n] for n in PRECISIONS] == [torch.bfloat16, torch.float16, torch.float32]
    # mixed_precision "no" and kohya's save_precision "float" are fp32
    assert PRECISION_DTYPES["no"] is PRECISION_DTYPES["float"] is torch.float32
    assert [precision_name(n) for n in ("no", "float", "fp32", "bf16", "fp16")] == [
        "fp32", "fp32", "fp32", "bf16", "fp16"]


def test_file_dtypes_follow_the_safetensors_names():
    assert all(SAFETENSORS_NAMES[t] == n for n, t in FLOAT_FILE_DTYPES.items())


def test_a_files_dominant_float_dtype_ignores_fp8_and_integers_and_keeps_the_first_on_a_tie():
    assert dominant_float_dtype(["F8_E4M3", "F8_E4M3", "BF16", "F32", "BF16", "I64"]) is torch.bfloat16
    assert dominant_float_dtype(["F16", "F32"]) is torch.float16
    assert dominant_float_dtype(["F8_E4M3", "U8"]) is torch.float32
