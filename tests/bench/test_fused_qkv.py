"""CPU smoke test of bench/fused_qkv.py: the tiny DiT's width, one block with LoRA, fused and separate q/k/v.

No timing is asserted (only that the numbers exist and are positive); the GPU numbers are run by hand
(bench/README.md)."""

from __future__ import annotations

import json

import pytest

from tests.bench.conftest import bench_script
FIELDS = ("config", "width", "heads", "blocks", "tokens", "batch", "rank", "dtype", "attention_kernel", "device",
          "torch", "block_ms_fused", "block_ms_separate", "self_attn_ms_fused", "self_attn_ms_separate",
          "saving_ms_per_block", "saving_pct_of_block", "self_attn_saving_ms", "self_attn_saving_pct_of_block",
          "keep_by_rule")


@pytest.fixture
def fused_qkv(monkeypatch):
    yield from bench_script("fused_qkv", monkeypatch)


def test_tiny_blocks_on_cpu_write_one_row_per_token_count(fused_qkv, monkeypatch, tmp_path, capsys):
    from anima_trainer.models.layers import QKNormAttentionBase

    fused_calls = []
    original = QKNormAttentionBase._project_fused
    monkeypatch.setattr(QKNormAttentionBase, "_project_fused",
                        lambda self, x: fused_calls.append(1) or original(self, x))
    out = tmp_path / "fused_qkv.json"
    rows = fused_qkv.main(["--config", "tiny", "--blocks", "2", "--tokens", "16", "64", "--steps", "2",
                           "--warmup", "1", "--device", "cpu", "--json-out", str(out)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == rows == json.loads(out.read_text(encoding="utf-8"))["results"]
    assert [r["tokens"] for r in rows] == [16, 64]
    for row in rows:
        assert all(k in row for k in FIELDS), [k for k in FIELDS if k not in row]
        assert row["device"] == "cpu" and row["dtype"] == "fp32" and row["width"] == 256 and row["blocks"] == 2
        assert min(row[k] for k in ("block_ms_fused", "block_ms_separate", "self_attn_ms_fused",
                                    "self_attn_ms_separate")) > 0
        assert row["keep_by_rule"] is None  # the rule is decided on a GPU only
    # the "on" timings ran the fused GEMM: per token count, (warm-up + timed) calls x (2 blocks + 1 self-attention)
    assert len(fused_calls) == 2 * (1 + 2) * 3
