"""CPU smoke test of bench/finetune_levers.py: the tiny DiT, block 0 trained with compensated bf16 AdamW, after
backward and fused into it.  No timing or memory is asserted (CPU has no peak counter here); the fused and the
unfused case must end on the same weights.  The GPU numbers are run by hand (bench/README.md)."""

from __future__ import annotations

import json

import pytest

from tests.bench.conftest import bench_script


@pytest.fixture
def finetune_levers(monkeypatch):
    yield from bench_script("finetune_levers", monkeypatch)


def test_tiny_fused_and_unfused_rows(finetune_levers, tmp_path, capsys):
    out = tmp_path / "levers.json"
    rows = finetune_levers.main(["--config", "tiny", "--resolution", "32", "--steps", "1", "--warmup", "1",
                                 "--device", "cpu", "--patterns", r"^blocks\.0\.", "--cases", "compensated_adamw",
                                 "compensated_adamw_fused", "--json-out", str(out)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == rows == json.loads(out.read_text(encoding="utf-8"))["results"]
    assert [r["case"] for r in rows] == ["compensated_adamw", "compensated_adamw_fused"]
    unfused, fused = rows
    assert unfused["trained_params"] == fused["trained_params"] > 0
    assert unfused["weights_checksum"] == fused["weights_checksum"]
    assert unfused["loss"] == fused["loss"] and unfused["ms_per_step"] > 0 and fused["peak_gib"] is None
    assert 0 < fused["predicted_gib"] < unfused["predicted_gib"]  # the fused pass holds no gradient set
