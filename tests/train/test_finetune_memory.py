"""The fine-tune memory model (train/finetune_memory.py): the issue's ≈ 34 GB for the 2B DiT with fp32 AdamW, a
selected-blocks subset, and what each lever removes."""

from __future__ import annotations

import math

import pytest

from anima_trainer.models.model_files import DitConfig
from anima_trainer.train.finetune_memory import (
    estimate_finetune_memory,
    optimizer_state_bytes,
    trained_bytes,
    trained_shapes,
)
from anima_trainer.train.memory_estimate import gib

DIT_2B = DitConfig()  # with the LLM adapter, as the published files
FULL_PARAMS = 2_091_068_928
BLOCK_PARAMS = 69_206_528
BLOCKS_14_18 = [r"^blocks\.1[4-8]\."]


def test_full_dit_with_fp32_adamw_is_the_issues_34_gb():
    shapes = list(trained_shapes(DIT_2B).values())
    out = trained_bytes(shapes, weights="fp32", optimizer="adamw")
    assert out.params == FULL_PARAMS
    assert (out.weights, out.grads, out.optimizer_state) == (4 * FULL_PARAMS, 4 * FULL_PARAMS, 8 * FULL_PARAMS)
    assert out.total == 16 * FULL_PARAMS
    assert out.total / 1e9 == pytest.approx(34, rel=0.02)  # "≈ 34 GB of weights, gradients and optimizer state"


def test_selected_blocks_are_exactly_those_parameters():
    shapes = trained_shapes(DIT_2B, BLOCKS_14_18)
    assert {int(n.split(".")[1]) for n in shapes} == {14, 15, 16, 17, 18}
    assert sum(math.prod(s) for s in shapes.values()) == 5 * BLOCK_PARAMS
    only_cross = trained_shapes(DIT_2B, [r"\.cross_attn\."])
    assert only_cross and all(".cross_attn." in n for n in only_cross)


def test_optimizer_state_per_tensor():
    assert optimizer_state_bytes((2048, 8192), "adamw") == 8 * 2048 * 8192
    assert optimizer_state_bytes((2048, 8192), "adafactor") == 4 * (2048 + 8192)  # factored: rows + columns
    assert optimizer_state_bytes((128,), "adafactor") == 4 * 128
    assert optimizer_state_bytes((1000,), "adamw8bit") == 2 * 1000 + 2 * 4 * 4  # + an fp32 absmax per 256-block
    with pytest.raises(ValueError, match="accepted are adamw, adamw8bit, adafactor"):
        optimizer_state_bytes((4,), "lion")


def test_each_lever_moves_its_part():
    shapes = list(trained_shapes(DIT_2B, BLOCKS_14_18).values())
    n = 5 * BLOCK_PARAMS
    largest = max(math.prod(s) for s in shapes)

    def tb(**kw):
        return trained_bytes(shapes, **kw)

    master, comp, plain = tb(weights="bf16_master"), tb(weights="bf16_compensated"), tb(weights="bf16")
    assert (master.weights, master.master, master.grads) == (2 * n, 4 * n, 2 * n)
    assert (comp.weights, comp.master, comp.grads, comp.transient) == (2 * n, 2 * n, 2 * n, 8 * largest)
    assert plain.total == 12 * n
    fused = tb(weights="bf16_compensated", fused_backward=True)
    assert fused.grads == 2 * largest == 2 * 8192 * 2048  # one gradient alive: the largest tensor's (MLP)
    offload = tb(weights="bf16_compensated", optimizer_offload=True)
    assert offload.optimizer_state == 0 and offload.host == 8 * n
    assert tb(weights="fp32", autocast_copy=True).weights == 6 * n
    with pytest.raises(ValueError, match="accepted are fp32, bf16_master"):
        tb(weights="fp8")


def test_predicted_peaks_add_up_and_order_by_lever():
    def peak(**kw):
        return estimate_finetune_memory(DIT_2B, resolution=1024, **kw)

    base = peak()
    parts = (base["frozen_weights_gib"] + base["trained_gib"] + base["autocast_copies_gib"]
             + base["activations_gib"])
    assert base["total_gib"] == pytest.approx(parts)
    assert base["trained_gib"] == pytest.approx(gib(16 * FULL_PARAMS)) and base["frozen_weights_gib"] == 0
    subset = peak(patterns=BLOCKS_14_18)
    assert subset["frozen_weights_gib"] == pytest.approx(gib(2 * (FULL_PARAMS - 5 * BLOCK_PARAMS)))
    assert subset["activations_gib"] == base["activations_gib"]
    levers = [peak(), peak(weights="bf16_compensated"), peak(weights="bf16_compensated", optimizer="adamw8bit"),
              peak(weights="bf16_compensated", optimizer="adafactor"),
              peak(weights="bf16_compensated", optimizer="adafactor", fused_backward=True)]
    totals = [e["total_gib"] for e in levers]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)
    assert totals[-1] < 24 < totals[0]  # predicted: the issue's 24 GB target needs the levers
