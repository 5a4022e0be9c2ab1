"""CPU smoke test of bench/merged_forward_numerics.py on a small width: one row per (ratio, path), the factor
gradients of both paths identical (the weight gradient is gᵀx either way), errors of bf16 size."""

from __future__ import annotations

import json

import pytest

from tests.bench.conftest import bench_script


@pytest.fixture
def numerics(monkeypatch):
    yield from bench_script("merged_forward_numerics", monkeypatch)


def test_rows_and_table(numerics, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert numerics.main(["--tokens", "32", "--width", "64", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["ratio"], r["path"]) for r in rows] == [(r, p) for r in numerics.RATIOS for p in numerics.PATHS]
    for sep, mer in zip(rows[::2], rows[1::2], strict=True):
        assert sep["grad_w1"] == mer["grad_w1"] and sep["grad_w2"] == mer["grad_w2"]
        assert 0 < sep["out"] < 1e-2 and 0 < mer["out"] < 1e-2
    assert abs(rows[-1]["seen"] - 1.0) < 1e-2  # a large update is applied whole
    assert "| 0.1 | merged |" in capsys.readouterr().out
