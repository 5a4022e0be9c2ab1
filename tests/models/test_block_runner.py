"""The DiT's block runner (models/block_runner.py): checkpoint depth and mode give identical outputs and gradients,
and what each mode keeps for backward, measured with the saved-tensor ledger.

Equality tests run in fp32 on a small random DiT with a LoRA whose up factors are non-zero, so every adapter
gets a gradient through every path; "identical" means max |Δ| ≤ 1e-6 (in practice bit-equal).
"""

from __future__ import annotations

import pytest
import torch

from anima_trainer.models.block_runner import setup_memory
from tests.support.ledger import SavedTensorLedger
from tests.support.small_dit import SMALL, TOL, inputs, lora, max_diff, small_dit, step


@pytest.fixture(scope="module")
def reference():
    dit = small_dit()
    net = lora(dit, train_adaln="true")
    return step(dit, net, *inputs())


CASES = [
    {"gradient_checkpointing": True},
    {"gradient_checkpointing": True, "checkpoint_mode": "selective"},
    {"gradient_checkpointing": True, "checkpoint_blocks": 0},
    {"gradient_checkpointing": True, "checkpoint_blocks": 1},
    {"gradient_checkpointing": True, "checkpoint_blocks": 3, "checkpoint_mode": "selective"},
    {"gradient_checkpointing": True, "cpu_offload_checkpointing": True},
    {"gradient_checkpointing": True, "checkpoint_mode": "selective", "cpu_offload_checkpointing": True},
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_checkpoint_mode_and_depth_gives_identical_outputs_and_gradients(reference, options):
    dit = setup_memory(small_dit(), device="cpu", **options)
    net = lora(dit, train_adaln="true")
    out, grads = step(dit, net, *inputs())
    assert (out - reference[0]).abs().max().item() <= TOL
    assert max_diff(grads, reference[1]) <= TOL
    assert all(g.abs().sum() > 0 for g in grads)  # every adapter (incl. adaLN) got a gradient


def ledger_total(dtype: torch.dtype, **options) -> dict[str, int]:
    dit = setup_memory(small_dit(dtype), device="cpu", **options)
    net = lora(dit)
    x, t, ctx = inputs(lat=16, rows=64)
    with SavedTensorLedger(dit, net, exclude_tensors=dit.rope(1, 8, 8, torch.device("cpu"))) as ledger:
        out = dit(x.to(dtype), t, ctx.to(dtype))
    summary = ledger.summary()
    out.float().mean().backward()  # the graph is usable (caches are consumed)
    return summary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_activation_bytes_full_lt_selective_lt_none(dtype):
    none = ledger_total(dtype)["total"]
    selective = ledger_total(dtype, gradient_checkpointing=True, checkpoint_mode="selective")
    full = ledger_total(dtype, gradient_checkpointing=True)["total"]
    assert selective["selective"] > 0  # the selective caches are counted
    assert full < selective["total"] < none
    # full keeps per block just its input: the fp32 residual [1, 64 tokens, 64] (4 bytes, whatever the dtype)
    residual = 64 * 64 * 4
    assert full >= SMALL.num_blocks * residual
    half = ledger_total(dtype, gradient_checkpointing=True, checkpoint_blocks=2)["total"]
    assert full < half < none  # the depth dial sits in between


def test_selective_mode_keeps_the_big_matmuls_and_attention_only():
    """What the tiny model's selective caches hold (docs/performance.md lists this)."""
    dit = setup_memory(small_dit(), device="cpu", gradient_checkpointing=True, checkpoint_mode="selective")
    lora(dit)
    x, t, ctx = inputs()
    with SavedTensorLedger(dit) as ledger:
        dit(x, t, ctx)
    kept: dict[str, list[tuple]] = {}
    for mode in ledger._sac:
        for key, entries in mode.storage.items():
            op = str(getattr(key, "overloadpacket", key[0] if isinstance(key, tuple) else key))
            for leaf in torch.utils._pytree.tree_leaves(entries):
                t = getattr(leaf, "val", leaf)
                if isinstance(t, torch.Tensor):
                    kept.setdefault(op, []).append(tuple(t.shape))
    assert set(kept) <= {"aten.mm", "aten._scaled_dot_product_flash_attention_for_cpu"}, kept
    assert "aten.mm" in kept and "aten._scaled_dot_product_flash_attention_for_cpu" in kept
    widths = {s[-1] for s in kept["aten.mm"]}
    # base projections (64), MLP hidden (256), adaLN (192/256 wide), LoRA down (rank 4) are kept; the LoRA up
    # products (contraction over rank 4 into 64/256 outputs) are recomputed
    assert 4 in widths and 64 in widths and 256 in widths
    per_block = sum(1 for s in kept["aten.mm"] if s[-1] == 4)
    assert per_block == 10 * SMALL.num_blocks  # one LoRA down output per target Linear
