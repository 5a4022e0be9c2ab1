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


def test_tiny_offloaded_rows_match_the_on_device_weights(finetune_levers, tmp_path, capsys):
    """--optimizer-offload: the same weights as on the device (CPU: the same arithmetic), the state predicted off
    the device; adamw8bit (CUDA tensors only) is refused."""
    common = ["--config", "tiny", "--resolution", "32", "--steps", "1", "--warmup", "1", "--device", "cpu",
              "--patterns", r"^blocks\.0\.", "--cases", "compensated_adamw_fused"]
    on_device, = finetune_levers.main(common)
    offloaded, = finetune_levers.main([*common, "--optimizer-offload"])
    assert offloaded["optimizer_offload"] and not on_device["optimizer_offload"]
    assert offloaded["weights_checksum"] == on_device["weights_checksum"] and offloaded["loss"] == on_device["loss"]
    assert 0 < offloaded["predicted_gib"] < on_device["predicted_gib"]  # AdamW's 8 bytes per parameter on the host
    with pytest.raises(SystemExit):
        finetune_levers.main([*common[:-1], "compensated_adamw8bit", "--optimizer-offload"])
    assert "adamw8bit (bitsandbytes) steps CUDA tensors only" in capsys.readouterr().err


def test_tiny_fused_row_with_swapped_trained_blocks_matches_no_swap(finetune_levers):
    """--blocks-to-swap: the fused case swaps both (trained) blocks of the tiny DiT and ends on the same weights
    as without swap; its prediction takes the swapped weights off (none here: all blocks are in flight)."""
    common = ["--config", "tiny", "--resolution", "32", "--steps", "1", "--warmup", "1", "--device", "cpu",
              "--cases", "compensated_adamw", "compensated_adamw_fused"]
    plain = finetune_levers.main(common)
    unfused, swapped = finetune_levers.main([*common, "--blocks-to-swap", "2"])
    assert (unfused["blocks_to_swap"], swapped["blocks_to_swap"]) == (0, 2)  # an unfused case cannot swap
    assert swapped["weights_checksum"] == plain[1]["weights_checksum"] == unfused["weights_checksum"]
    assert swapped["loss"] == plain[1]["loss"] and swapped["predicted_gib"] == plain[1]["predicted_gib"]
