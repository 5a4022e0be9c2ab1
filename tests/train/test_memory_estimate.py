"""The memory estimator (train/memory_estimate.py): the H200 table, which option moves which part, and its
activation constants against a ledger measurement."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from anima_trainer.models.block_runner import setup_memory
from anima_trainer.models.model_files import DitConfig
from anima_trainer.train.memory_estimate import ACTIVATION_UNITS, estimate_training_memory
from tests.support.ledger import SavedTensorLedger
from tests.support.small_dit import SMALL, inputs, lora, small_dit

H200 = [  # bench/README.md: 2b, rank 32, bf16, AdamW; (resolution, batch, checkpointing) → peak GiB
    (1024, 1, False, 17.47), (1024, 1, True, 5.72), (1024, 4, False, 56.85), (1024, 4, True, 10.12),
    (512, 4, False, 18.13),
]


@pytest.mark.parametrize("resolution, batch, ckpt, measured", H200)
def test_estimator_reproduces_the_h200_table(resolution, batch, ckpt, measured):
    est = estimate_training_memory(DitConfig(has_llm_adapter=False), resolution=resolution, batch=batch, rank=32,
                                   dtype="bf16", gradient_checkpointing=ckpt)
    assert est["total_gib"] == pytest.approx(measured, rel=0.15)
    assert est["total_gib"] == pytest.approx(measured, rel=0.03)  # what it actually achieves
    assert est["lora_params"] == 45_875_200  # 28 blocks × 10 targets at rank 32
    parts = est["weights_gib"] + est["adapter_optimizer_gib"] + est["activations_gib"]
    assert parts == pytest.approx(est["total_gib"])


def test_estimator_options_move_the_right_parts():
    cfg = DitConfig(has_llm_adapter=False)

    def est(**kw):
        return estimate_training_memory(cfg, resolution=1024, batch=1, rank=32, gradient_checkpointing=True, **kw)

    base = est()
    assert est(fp8_base=True)["weights_gib"] / base["weights_gib"] == pytest.approx(0.56, abs=0.02)
    swap = est(blocks_to_swap=26)
    assert swap["resident_blocks"] == 2 + 3 and swap["total_gib"] <= 3.0  # the "≤ 3 GiB with 26 swapped" target
    assert est(cpu_offload_checkpointing=True)["activations_gib"] < base["activations_gib"]
    sel = est(checkpoint_mode="selective")["activations_gib"]
    none = estimate_training_memory(cfg, resolution=1024, rank=32)["activations_gib"]
    assert base["activations_gib"] < sel < none
    half = est(checkpoint_blocks=14)["activations_gib"]
    assert base["activations_gib"] < half < none
    assert est()["total_gib"] < 15.0 and est(checkpoint_mode="selective")["total_gib"] < 15.0  # a 16 GB card
    with_llm_adapter = estimate_training_memory(DitConfig(), resolution=1024, gradient_checkpointing=True)
    assert with_llm_adapter["weights_gib"] - base["weights_gib"] == pytest.approx(134_663_680 * 2 / 2**30)


def test_activation_units_match_a_measurement():
    """The estimator's per-block constants are what the ledger measures (bf16 and fp32, small model, 2 vs 4
    blocks and two token counts, so the per-block, per-token part is isolated)."""
    def total(nb: int, lat: int, dtype: torch.dtype, **options) -> int:
        cfg = dataclasses.replace(SMALL, num_blocks=nb)
        dit = setup_memory(small_dit(dtype, cfg), device="cpu", **options)
        net = lora(dit)
        x, t, ctx = inputs(cfg, lat=lat, rows=32)
        rope = dit.rope(1, lat // 2, lat // 2, torch.device("cpu"))
        with SavedTensorLedger(dit, net, exclude_tensors=rope) as ledger:
            dit(x.to(dtype), t, ctx.to(dtype))
        return ledger.summary()["total"]

    unit = SMALL.model_channels * 2
    for dtype, table in ((torch.bfloat16, ACTIVATION_UNITS["half"]), (torch.float32, ACTIVATION_UNITS["fp32"])):
        for mode, options in (("none", {}), ("full", {"gradient_checkpointing": True}),
                              ("selective", {"gradient_checkpointing": True, "checkpoint_mode": "selective"})):
            small = (total(4, 16, dtype, **options) - total(2, 16, dtype, **options)) / 2
            large = (total(4, 32, dtype, **options) - total(2, 32, dtype, **options)) / 2
            per_token = (large - small) / (256 - 64) / unit
            assert per_token == pytest.approx(table[mode][0], rel=0.05), (dtype, mode)
