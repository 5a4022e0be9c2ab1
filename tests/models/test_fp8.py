"""fp8 storage of the DiT's block weights (models/fp8.py): error bound, targets, memory, training on an fp8
base, equality with checkpointing, saving and merging rules."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from anima_trainer.models import load_dit
from anima_trainer.models.block_runner import setup_memory
from anima_trainer.models.dit import AnimaDiT
from anima_trainer.models.fp8 import Fp8Linear, dequantize_fp8, fp8_targets, quantize_fp8, refuse_fp8
from anima_trainer.networks import create_network
from tests.support.small_dit import SMALL, TOL, inputs, lora, max_diff, small_dit, step


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
    dit = AnimaDiT(dataclasses.replace(SMALL, has_llm_adapter=True, llm_adapter_vocab=64, llm_adapter_dim=32,
                                       llm_adapter_source_dim=32, llm_adapter_heads=2, llm_adapter_mlp_dim=64))
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
