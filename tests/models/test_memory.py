"""Checkpointing depth/mode, fp8 storage, saved-activation accounting and the memory estimator (models/memory.py).

Equality tests run in fp32 on a small random DiT with a LoRA whose up factors are non-zero, so every adapter
gets a gradient through every path; "identical" means max |Δ| ≤ 1e-6 (in practice bit-equal).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from anima_trainer.models import load_dit
from anima_trainer.models.checkpoint import DitConfig
from anima_trainer.models.dit import AnimaDiT
from anima_trainer.models.memory import (ACTIVATION_UNITS, Fp8Linear, SavedTensorLedger, check_network_fp8,
                                         dequantize_fp8, estimate_training_memory, fp8_targets, quantize_fp8,
                                         refuse_fp8, setup_memory)
from anima_trainer.networks import create_network

# the 2B model's proportions at width 64 (adaLN rank = width / 8, MLP 4×, context width / 2)
SMALL = DitConfig(num_blocks=4, model_channels=64, num_heads=4, head_dim=16, mlp_dim=256, crossattn_dim=32,
                  adaln_lora_dim=8, has_llm_adapter=False)
TOL = 1e-6


def small_dit(dtype: torch.dtype = torch.float32, config: DitConfig = SMALL) -> AnimaDiT:
    torch.manual_seed(0)
    return AnimaDiT(config).to(dtype).requires_grad_(False)


def inputs(config: DitConfig = SMALL, lat: int = 16, rows: int = 512, batch: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 16, 1, lat, lat, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, rows, config.crossattn_dim, generator=g))


def lora(dit: AnimaDiT, **args: str):
    torch.manual_seed(2)
    net = create_network(dit, dim=4, alpha=4, **args)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.normal_(0, 0.05)
    return net


def step(dit: AnimaDiT, net, x, t, ctx) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = dit(x.to(dit.dtype), t, ctx.to(dit.dtype))
    out.float().square().mean().backward()
    grads = [p.grad.clone() for p in net.trainable_parameters()]
    net.zero_grad(set_to_none=True)
    return out.detach(), grads


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


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


# ------------------------------------------------------------------------------------------------ fp8 --
@pytest.fixture(scope="module")
def tiny32(tiny_dit_path):
    dit = load_dit(tiny_dit_path, dtype=torch.float32)
    dit.llm_adapter = None  # the fixture's context is the adapter's output already
    return dit


@pytest.fixture(scope="module")
def tiny_ref(tiny32, dit_io):
    with torch.no_grad():
        return tiny32(dit_io["x"], dit_io["sigma"], dit_io["c_crossattn"])


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("fmt, bound", [("e4m3fn", 3e-2), ("e5m2", 6e-2)])
def test_fp8_output_error_is_bounded(tiny32, tiny_ref, dit_io, fmt, bound):
    """rel. L2 of the velocity against the fp32 model (fixture DiT and inputs); measured: e4m3fn 0.017, e5m2 0.037."""
    dit = copy.deepcopy(tiny32)
    assert quantize_fp8(dit, fmt) == 10 * 10  # self/cross q, k, v, output_proj + MLP layer1/2 of 10 blocks
    with torch.no_grad():
        out = dit(dit_io["x"], dit_io["sigma"], dit_io["c_crossattn"])
    err = rel_l2(out, tiny_ref)
    assert 0 < err < bound


def test_fp8_targets_are_attention_and_mlp_weights_only():
    dit = AnimaDiT(dataclasses.replace(SMALL, has_llm_adapter=True, adapter_vocab=64, adapter_dim=32,
                                       adapter_source_dim=32, adapter_heads=2, adapter_mlp_dim=64))
    quantize_fp8(dit)
    fp8 = {n for n, m in dit.named_modules() if isinstance(m, Fp8Linear)}
    assert fp8 == set(fp8_targets(dit))
    for name in fp8:
        assert ".adaln_modulation" not in name and name.startswith("blocks.")
        m = dit.get_submodule(name)
        assert m.weight.dtype == torch.float8_e4m3fn and not m.weight.requires_grad
        assert m.weight_scale.dtype == torch.float32 and m.weight_scale.numel() == 1
    kept = [m for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear) and n not in fp8]
    assert kept and all(m.weight.dtype == torch.float32 for m in kept)  # adaLN, embedders, final, LLM adapter


def block_bytes(dit: AnimaDiT, only_fp8_targets: bool = False) -> int:
    names = set(fp8_targets(dit)) if only_fp8_targets else None
    total = 0
    for name, t in [*dit.blocks.named_parameters(prefix="blocks"), *dit.blocks.named_buffers(prefix="blocks")]:
        module = name.rsplit(".", 1)[0]
        if names is None or module in names:
            total += t.numel() * t.element_size()
    return total


def test_fp8_halves_the_block_weight_memory():
    dit = small_dit(torch.bfloat16)
    linear_bf16, blocks_bf16 = block_bytes(dit, True), block_bytes(dit)
    n = quantize_fp8(dit)
    assert block_bytes(dit, True) == linear_bf16 // 2 + 4 * n  # fp8 weights + one fp32 scale each
    assert block_bytes(dit) / blocks_bf16 < 0.56  # adaLN Linears stay bf16 (9 % of a block)


def test_lora_trains_on_an_fp8_base():
    dit = small_dit()
    quantize_fp8(dit)
    net = create_network(dit, dim=4, alpha=4)
    params = net.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, s, c = inputs()
    target = torch.zeros_like(x)
    losses = []
    for _ in range(3):
        loss = (dit(x, s, c) - target).square().mean()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in dit.parameters())  # nothing flows into the frozen fp8 base


def test_fp8_backward_keeps_the_fp8_weight_not_a_dequantised_copy():
    dit = small_dit(torch.bfloat16)
    quantize_fp8(dit)
    create_network(dit, dim=4, alpha=4)
    shapes = {tuple(m.weight.shape) for m in fp8_targets(dit).values()}
    saved: list[torch.Tensor] = []
    x, t, ctx = inputs(lat=20, rows=48)  # 100 tokens: no activation has a weight's shape
    with torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(v) or v, lambda v: v):
        dit(x.to(torch.bfloat16), t, ctx.to(torch.bfloat16))
    others = {p.untyped_storage().data_ptr() for p in dit.parameters() if p.dtype != torch.float8_e4m3fn}
    weights = [v for v in saved if (tuple(v.shape) in shapes or tuple(v.shape[::-1]) in shapes)
               and v.untyped_storage().data_ptr() not in others]  # (the final layer's [64, 64] weight)
    assert weights and all(v.dtype == torch.float8_e4m3fn for v in weights)


def test_fp8_with_checkpointing_gives_the_same_gradients():
    results = []
    for options in ({}, {"gradient_checkpointing": True}, {"gradient_checkpointing": True,
                                                            "checkpoint_mode": "selective"}):
        dit = setup_memory(small_dit(), device="cpu", fp8_base=True, **options)
        results.append(step(dit, lora(dit), *inputs()))
    for out, grads in results[1:]:
        assert (out - results[0][0]).abs().max().item() <= TOL and max_diff(grads, results[0][1]) <= TOL


def test_fp8_dit_saves_networks_only_and_merging_is_refused(tmp_path):
    from safetensors.torch import load_file

    dit = small_dit()
    quantize_fp8(dit)
    net = lora(dit)
    path = net.save(tmp_path / "net.safetensors")  # the save-time ComfyUI key check runs against the fp8 DiT
    keys = set(load_file(path))
    assert keys and all(".lora_" in k or k.endswith(".alpha") for k in keys)
    with pytest.raises(ValueError, match="fp8"):
        refuse_fp8(dit, "merge")
    with pytest.raises(ValueError, match="remove the injected network"):
        dequantize_fp8(dit)
    net.remove()
    expected = {n: m.dequantized_weight(torch.float32) for n, m in dit.named_modules() if isinstance(m, Fp8Linear)}
    assert dequantize_fp8(dit) == len(expected)
    refuse_fp8(dit, "merge")  # plain again
    for n, w in expected.items():
        m = dit.get_submodule(n)
        assert type(m) is torch.nn.Linear and torch.equal(m.weight, w)


def test_quantizing_after_injection_is_refused():
    dit = small_dit()
    create_network(dit, dim=4, alpha=4)
    with pytest.raises(ValueError, match="before injecting"):
        quantize_fp8(dit)
    assert not any(isinstance(m, Fp8Linear) for m in dit.modules())


def test_dora_is_refused_on_fp8():
    dit = small_dit()
    quantize_fp8(dit)
    net = create_network(dit, dim=4, alpha=4, dora_wd="true")
    with pytest.raises(ValueError, match="DoRA"):
        check_network_fp8(dit, net)
    plain = small_dit()
    check_network_fp8(plain, create_network(plain, dim=4, alpha=4, dora_wd="true"))  # no fp8: fine


# ------------------------------------------------------------------------------------------ estimator --
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
    with_adapter = estimate_training_memory(DitConfig(), resolution=1024, gradient_checkpointing=True)
    assert with_adapter["weights_gib"] - base["weights_gib"] == pytest.approx(134_663_680 * 2 / 2**30)
