"""CPU smoke test of bench/ema_bf16_exact.py on a few thousand weights: the exact average equals the fp32-master
run's EMA bitwise (the bench raises otherwise), the rounded one does not, and both bf16 copies round within an
ulp of it."""

from __future__ import annotations

import json

import pytest

from tests.bench.conftest import bench_script


@pytest.fixture
def ema_bf16_exact(monkeypatch):
    yield from bench_script("ema_bf16_exact", monkeypatch)


def test_exact_average_is_the_master_ema_and_the_rounded_one_is_not(ema_bf16_exact, tmp_path, capsys):
    out = tmp_path / "ema.json"
    rows = ema_bf16_exact.main(["--weights", "4096", "--steps", "20", "--lrs", "1e-5", "--json", str(out)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == rows == json.loads(out.read_text(encoding="utf-8"))["results"]
    rounded, exact = rows
    assert (rounded["average"], exact["average"]) == ("rounded", "exact")
    assert exact["shadow_err_ulp"] == exact["shadow_err_max_ulp"] == exact["bf16_flipped"] == 0.0
    assert rounded["shadow_err_ulp"] > 0 and rounded["moved"] == exact["moved"] > 0
    assert 0 < exact["bf16_err_ulp"] <= 0.5 and rounded["bf16_err_ulp"] <= 1.0
