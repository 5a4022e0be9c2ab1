"""CPU smoke test of bench/ema_update.py: the EMA update with the shadow beside the weights and in host memory, on
two blocks of the tiny DiT.  No timing is asserted (speed is the benchmark's to measure, on a GPU: bench/README.md)."""

from __future__ import annotations

import math

import pytest

from tests.bench.conftest import bench_script


@pytest.fixture
def ema_update(monkeypatch):
    yield from bench_script("ema_update", monkeypatch)


def test_tiny_device_and_host_rows(ema_update, capsys):
    out = ema_update.main(["--config", "tiny", "--blocks", "2", "--device", "cpu", "--steps", "1", "--warmup", "1"])
    assert '"results"' in capsys.readouterr().out
    meta, results = out["meta"], out["results"]
    per_block = sum(math.prod(s) for s in ema_update.trained_shapes(ema_update.CONFIGS["tiny"],
                                                                    [r"^blocks\.0\."]).values())
    assert meta["trained_params"] == 2 * per_block > 0 and meta["shadow_gib"] == 4 * meta["trained_params"] / 2**30
    assert set(results) == {"device", "host"}
    assert all(r["ms_per_update"] > 0 and r["device_mib_held"] is None for r in results.values())
