"""Fused q/k/v: the same outputs and gradients as three projections (fp32: max |Δ| ≤ 1e-5 · max |ref|), with
LoRA / DoRA / LoKr / LoHa / train_norm injected, dropout included; state dict, saves and merges unchanged."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from anima_trainer.models import load_dit
from anima_trainer.models.layers import QKNormAttentionBase, patched_linear, set_fused_qkv
from anima_trainer.networks import apply_network_file, create_network

RTOL = 1e-5  # fp32: a different GEMM blocking only reorders sums


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    return bool((a - b).abs().max() <= rtol * b.abs().max().clamp_min(1e-12))


def randomize(network, seed: int = 0) -> None:
    """Non-zero factors everywhere (the zero-initialised ones would hide the branch)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def inputs(b: int = 2, h: int = 8, w: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 16, 1, h, w, generator=g), torch.rand(b, generator=g), torch.randn(b, 24, 64, generator=g)


def step(dit, network, x, t, ctx, seed: int = 7) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)  # dropout masks: the same draws in the same order
    out = dit(x, t, ctx)
    out.square().mean().backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in network.trainable_parameters()]
    network.zero_grad(set_to_none=True)
    return out.detach(), grads


def self_attns(dit) -> list[QKNormAttentionBase]:
    return [b.self_attn for b in dit.blocks]


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    orig = QKNormAttentionBase._project_fused

    def spy(self, x):
        calls.append(self)
        return orig(self, x)

    monkeypatch.setattr(QKNormAttentionBase, "_project_fused", spy)
    return calls


NETWORKS = {
    "lora": ("lora", {}),
    "lora_all_qkv_dropouts": ("lora", {"rank_dropout": "0.2", "module_dropout": "0.3"}),
    "dora": ("lora", {"dora_wd": "true"}),
    "lokr": ("lokr", {"factor": "4"}),
    "loha": ("loha", {}),
    "lora_train_norm": ("lora", {"train_norm": "true"}),
}


@pytest.mark.parametrize("case", NETWORKS)
def test_fused_equals_separate_with_network(dit, case, fused_calls):
    algo, args = NETWORKS[case]
    dropout = 0.25 if case == "lora_all_qkv_dropouts" else None
    network = create_network(dit, algo, dim=4, alpha=2.0, dropout=dropout, **args)
    assert {f"blocks.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv"} <= set(network.modules_by_name)
    randomize(network)
    network.train()
    x, t, ctx = inputs()
    ref_out, ref_grads = step(dit, network, x, t, ctx)
    assert not fused_calls
    assert set_fused_qkv(dit, True) == len(dit.blocks)
    out, grads = step(dit, network, x, t, ctx)
    assert len(fused_calls) == len(dit.blocks)  # the fused path ran, in every block
    assert close(out, ref_out)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert close(g, r), case


@pytest.mark.parametrize("multiplier", [0.0, 0.5])
def test_multiplier_is_honoured(dit, multiplier, fused_calls):
    network = create_network(dit, "lora", dim=4, alpha=4.0)
    randomize(network)
    network.set_multiplier(multiplier)
    x, t, ctx = inputs()
    with torch.no_grad():
        ref = dit(x, t, ctx)
        set_fused_qkv(dit, True)
        out = dit(x, t, ctx)
    assert fused_calls and close(out, ref)


def test_unknown_patch_runs_whole(dit):
    """A forward patch that is not an anima-trainer network is called as is (exact, one more GEMM)."""
    lin = dit.blocks[0].self_attn.k_proj
    org = lin.forward
    lin.forward = lambda x: org(x) * 2.0
    lin._anima_network_patched = True
    x = torch.randn(2, 5, 64)
    base = torch.nn.functional.linear(x, lin.weight)
    assert torch.equal(patched_linear(lin, x, base), org(x) * 2.0)
    x, t, ctx = inputs()
    with torch.no_grad():
        ref = dit(x, t, ctx)
        set_fused_qkv(dit, True)
        assert close(dit(x, t, ctx), ref)


def test_state_dict_keys_values_and_save_unchanged(dit, dit_file, tmp_path):
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    names = [n for n, _ in dit.named_parameters()]
    set_fused_qkv(dit, True)
    attn = dit.blocks[0].self_attn
    assert attn.check_qkv_packed()
    q, k = attn.q_proj.weight, attn.k_proj.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()  # one storage
    assert isinstance(q, torch.nn.Parameter) and q.shape == (64, 64)
    after = dit.state_dict()
    assert list(after) == list(before) and [n for n, _ in dit.named_parameters()] == names
    assert all(torch.equal(after[k], before[k]) for k in before)
    path = tmp_path / "fused.safetensors"
    save_file(after, str(path))  # packed views save as separate tensors
    loaded = load_file(str(path))
    assert set(loaded) == set(before) and all(torch.equal(loaded[k], before[k]) for k in before)


def test_packing_survives_to_and_load(dit, dit_file):
    set_fused_qkv(dit, True)
    x, t, ctx = inputs()
    with torch.no_grad():
        ref = dit(x, t, ctx)
    dit.to(torch.float64)  # every Parameter converted on its own: re-packed by _apply
    assert all(a.check_qkv_packed() for a in self_attns(dit))
    dit.to(torch.float32)
    assert all(a.check_qkv_packed() for a in self_attns(dit))
    fresh = load_dit(dit_file, dtype=torch.float32)
    set_fused_qkv(fresh, True)
    fresh.load_state_dict(dit.state_dict(), assign=True)  # new tensors assigned: re-packed by the post hook
    with torch.no_grad():
        assert all(a.check_qkv_packed() for a in self_attns(fresh))
        assert close(fresh(x, t, ctx), ref) and close(dit(x, t, ctx), ref)


def test_broken_packing_falls_back_to_separate_projections(dit, fused_calls):
    set_fused_qkv(dit, True)
    x, t, ctx = inputs()
    with torch.no_grad():
        ref = dit(x, t, ctx)
        n = len(fused_calls)
        attn = dit.blocks[1].self_attn
        attn.v_proj.weight.data = attn.v_proj.weight.data.clone() * 1.5  # moved behind our back
        assert not attn.check_qkv_packed()
        out = dit(x, t, ctx)
    assert len(fused_calls) == n + 1  # block 0 fused, block 1 separate (and it sees the new v weight)
    assert not close(out, ref)
    set_fused_qkv(dit, False)
    with torch.no_grad():
        assert close(out, dit(x, t, ctx))


def test_trainable_base_weights_use_separate_projections(dit, fused_calls):
    set_fused_qkv(dit, True)
    dit.blocks[0].self_attn.q_proj.weight.requires_grad_(True)
    x, t, ctx = inputs()
    dit(x, t, ctx).sum().backward()
    assert len(fused_calls) == 1  # only block 1: block 0's q weight needs its own gradient
    assert dit.blocks[0].self_attn.q_proj.weight.grad is not None


def test_merge_into_fused_model(dit, dit_file, tmp_path):
    """apply_network_file writes into the packed storage: fused + merged == separate + merged == injected."""
    network = create_network(dit, "lora", dim=4, alpha=4.0)
    randomize(network)
    path = network.save(tmp_path / "lora.safetensors")
    x, t, ctx = inputs()
    with torch.no_grad():
        injected = dit(x, t, ctx)
    merged = {}
    for fused in (False, True):
        model = load_dit(dit_file, dtype=torch.float32)
        set_fused_qkv(model, fused)
        report = apply_network_file(model, path)
        assert "blocks.0.self_attn.q_proj.weight" in report["patched"] and not report["errors"]
        if fused:
            assert all(a.check_qkv_packed() for a in self_attns(model))
        with torch.no_grad():
            merged[fused] = model(x, t, ctx)
    assert close(merged[True], merged[False])
    assert close(merged[True], injected, rtol=1e-4)  # merge = W + ΔW in fp32 vs. the factored branch


def test_non_plain_linear_is_not_fused(dit, fused_calls):
    """A Linear subclass with its own forward (e.g. fp8 storage) computes something else than F.linear(x, W)."""

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0.5

    set_fused_qkv(dit, True)
    x, t, ctx = inputs()
    with torch.no_grad():
        for b in dit.blocks:
            b.self_attn.q_proj.__class__ = Scaled
        out = dit(x, t, ctx)
        assert not fused_calls and not dit.blocks[0].self_attn.pack_qkv()
        set_fused_qkv(dit, False)
        assert close(out, dit(x, t, ctx))
