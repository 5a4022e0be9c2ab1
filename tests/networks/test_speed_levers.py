"""The training step's speed levers give the results of the plain path (docs/performance.md "Levers of the
training step"): the LoRA factors cast once per forward pass (bit-identical outputs and grads in bf16 and
fp32, eager, checkpointed and compiled without a recompile per step; stale casts are never used) and the q/k/v
down projections as one GEMM (fp32 max |Δ| ≤ 1e-5 · max |ref|, bf16 ≤ 2e-2 · max |ref|; exact fallbacks where
a random draw, DoRA or a zero multiplier needs the separate branches)."""

from __future__ import annotations

import pytest
import torch

from anima_trainer.demo import write_tiny_qwen3
from anima_trainer.models import load_dit
from anima_trainer.models.compile import compile_dit_blocks
from anima_trainer.models.layers import set_fused_qkv
from anima_trainer.models.text import load_qwen3
from anima_trainer.networks import create_network

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make(dit_file, dtype=torch.bfloat16, algo="lora", fuse=True, prepare=None, **args):
    """A tiny DiT in `dtype` with fused q/k/v and a network whose factors are all non-zero (`prepare(dit)` runs
    before the network is built, e.g. fp8 storage)."""
    dit = load_dit(dit_file, dtype=dtype)
    if prepare is not None:
        prepare(dit)
    net = create_network(dit, algo, dim=4, alpha=4.0, **args)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    set_fused_qkv(dit, fuse)
    return dit, net


def step(dit, net, seed: int = 0):
    """Output, input grad and factor grads (None kept) of one forward/backward."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 1, 8, 8, generator=g).requires_grad_()
    t, ctx = torch.rand(1, generator=g), torch.randn(1, 24, 64, generator=g)
    torch.manual_seed(seed)  # dropout draws
    out = dit(x, t, ctx)
    out.float().square().mean().backward()
    grads = [None if p.grad is None else p.grad.clone() for p in net.trainable_parameters()]
    net.zero_grad(set_to_none=True)
    return out.detach().float(), x.grad.float(), grads


def same(a, b, tol: float | None = None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if tol is None:
        return torch.equal(a, b)
    return bool((a.float() - b.float()).abs().max() <= tol * b.float().abs().max())


def assert_steps_match(got, ref, tol: float | None = None) -> None:
    assert same(got[0], ref[0], tol) and same(got[1], ref[1], tol)
    assert len(got[2]) == len(ref[2])
    assert all(same(a, b, tol) for a, b in zip(got[2], ref[2], strict=True))


def casts_present(net) -> int:
    return sum(m._casts is not None for m in net.lora_modules)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ckpt", [False, True])
def test_cast_once_is_bit_identical(dit_file, dtype, ckpt):
    """Only the cast lever (fused down off): the same casts, so the same bits — also when a checkpointed
    block recomputes its forward in the backward."""
    dit, net = make(dit_file, dtype)
    dit.runner.gradient_checkpointing = ckpt
    net.set_speed_levers(cast_factors_once=False, fuse_qkv_down=False)
    ref = step(dit, net)
    net.set_speed_levers(cast_factors_once=True)
    got = step(dit, net)
    assert casts_present(net) == (len(net.lora_modules) if dtype == torch.bfloat16 else 0)
    assert_steps_match(got, ref)
    assert all(g is not None for g in got[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_down_matches_separate(dit_file, dtype):
    dit, net = make(dit_file, dtype)
    net.set_speed_levers(cast_factors_once=False, fuse_qkv_down=False)
    ref = step(dit, net)
    for cast in (False, True):
        net.set_speed_levers(cast_factors_once=cast, fuse_qkv_down=True)
        assert_steps_match(step(dit, net), ref, TOL[dtype])


def test_fused_down_is_what_runs(dit_file, monkeypatch):
    """The fused path is taken (one down GEMM for q, k, v), reading the stacked once-per-forward cast."""
    from anima_trainer.networks.lora import LoRAModule

    dit, net = make(dit_file)
    calls = []
    original = LoRAModule.add_to_outputs_fused

    def spy(owners, outs, x):
        result = original(owners, outs, x)
        calls.append((result is not None, owners[0]._stacked_down is not None))
        return result

    monkeypatch.setattr(LoRAModule, "add_to_outputs_fused", staticmethod(spy))
    step(dit, net)
    assert calls == [(True, True)] * len(dit.blocks)


def test_stale_casts_are_never_used(dit_file):
    """After an in-place update (an optimizer step) a Linear called without the model's forward (no pre-hook)
    sees the new factors; the next model forward recasts."""
    dit, net = make(dit_file)
    step(dit, net)
    module = net.modules_by_name["blocks.0.mlp.layer1"]
    linear = dit.get_submodule("blocks.0.mlp.layer1")
    x = torch.randn(3, linear.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        module.lora_up.weight.mul_(3.0)
        got = linear(x)
        net.set_speed_levers(cast_factors_once=False)
        ref = linear(x)
    assert torch.equal(got, ref)
    net.set_speed_levers(cast_factors_once=True)
    step(dit, net)
    assert module.cast_valid(1, module.lora_up.weight, torch.bfloat16)


def test_no_grad_preview_then_training(dit_file):
    """A preview (no_grad) between steps casts without a graph; the training forward after it gets grads."""
    dit, net = make(dit_file)
    net.set_speed_levers(cast_factors_once=False, fuse_qkv_down=False)
    ref = step(dit, net)
    net.set_speed_levers(cast_factors_once=True, fuse_qkv_down=False)
    with torch.no_grad():
        dit(torch.randn(1, 16, 1, 8, 8), torch.rand(1), torch.randn(1, 24, 64))
    assert not net.lora_modules[0]._casts[0].requires_grad
    assert_steps_match(step(dit, net), ref)


def test_module_dropout_leaves_skipped_grads_none(dit_file):
    """module_dropout: the same branches skipped (same draws), their grads None (not zero) with the levers."""
    dit, net = make(dit_file, module_dropout="0.5")
    net.train()
    net.set_speed_levers(cast_factors_once=False, fuse_qkv_down=False)
    ref = step(dit, net, seed=3)
    assert any(g is None for g in ref[2]) and any(g is not None for g in ref[2])
    net.set_speed_levers(cast_factors_once=True, fuse_qkv_down=True)
    assert_steps_match(step(dit, net, seed=3), ref)


@pytest.mark.parametrize("args", [{"rank_dropout": "0.3"}, {"dora_wd": "true"}, {"dropout": 0.2}])
def test_random_draws_and_dora_fall_back_exactly(dit_file, args):
    """dropout / rank_dropout (training) and DoRA run the separate branches: the same draws, the same bits."""
    dropout = args.pop("dropout", None)
    dit, net = make(dit_file, **args)
    for m in net.lora_modules:
        m.dropout = dropout
    net.train()
    net.set_speed_levers(cast_factors_once=False, fuse_qkv_down=False)
    ref = step(dit, net, seed=5)
    net.set_speed_levers(cast_factors_once=True, fuse_qkv_down=True)
    assert_steps_match(step(dit, net, seed=5), ref)


def test_different_ranks_and_multipliers(dit_file):
    dit, net = make(dit_file, torch.float32, network_reg_dims=r".*\.k_proj=2,.*\.v_proj=6")
    assert {net.modules_by_name["blocks.0.self_attn." + n].dim for n in ("q_proj", "k_proj", "v_proj")} == {4, 2, 6}
    for multiplier in (0.5, 0.0, -1.0):
        net.set_multiplier(multiplier)
        net.set_speed_levers(cast_factors_once=False, fuse_qkv_down=False)
        ref = step(dit, net)
        net.set_speed_levers(cast_factors_once=True, fuse_qkv_down=True)
        got = step(dit, net)
        assert_steps_match(got, ref, None if multiplier == 0.0 else TOL[torch.float32])


def test_text_encoder_factors_cast_once(dit_file, tmp_path):
    dit = load_dit(dit_file, dtype=torch.bfloat16)
    qwen3 = load_qwen3(write_tiny_qwen3(tmp_path / "q.safetensors"), dtype=torch.bfloat16)
    net = create_network(dit, "lora", 4, 2.0, text_encoder=qwen3, train_dit=False)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.05)
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(0))

    def run():
        out = qwen3(input_ids=ids).last_hidden_state.float()
        out.square().mean().backward()
        grads = [p.grad.clone() for p in net.trainable_parameters()]
        net.zero_grad(set_to_none=True)
        return out.detach(), grads

    net.set_speed_levers(cast_factors_once=False)
    ref = run()
    net.set_speed_levers(cast_factors_once=True)
    got = run()
    assert casts_present(net) == len(net.lora_modules)
    assert torch.equal(got[0], ref[0]) and all(torch.equal(a, b) for a, b in zip(got[1], ref[1], strict=True))


def test_remove_drops_the_hooks_and_casts(dit_file):
    dit, net = make(dit_file)
    step(dit, net)
    net.remove()
    assert casts_present(net) == 0 and not dit._forward_pre_hooks
    net.inject()
    step(dit, net)
    assert casts_present(net) == len(net.lora_modules)



@pytest.mark.parametrize("ckpt", [False, True])
def test_compiled_levers_match_eager_without_recompiling(dit_file, dynamo, ckpt):
    """bf16 DiT, per-block compile (aot_eager on CPU): the levers give the eager plain path's results, and steps
    with new casts after each optimizer update reuse the graphs (no recompile per step)."""
    dit, net = make(dit_file)
    dit.runner.gradient_checkpointing = ckpt
    net.set_speed_levers(cast_factors_once=False, fuse_qkv_down=False)
    refs = []
    state = [p.detach().clone() for p in net.trainable_parameters()]
    for i in range(3):
        refs.append(step(dit, net, seed=i))
        with torch.no_grad():
            for p in net.trainable_parameters():
                p.mul_(1.01)
    with torch.no_grad():
        for p, s in zip(net.trainable_parameters(), state, strict=True):
            p.copy_(s)
    net.set_speed_levers(cast_factors_once=True, fuse_qkv_down=True)
    compile_dit_blocks(dit, backend="aot_eager", fullgraph=True, max_shapes=1)
    for i in range(3):
        assert_steps_match(step(dit, net, seed=i), refs[i], TOL[torch.bfloat16])
        if i == 0:
            graphs = dynamo["stats"]["unique_graphs"]
            assert graphs >= 1
        with torch.no_grad():
            for p in net.trainable_parameters():
                p.mul_(1.01)
    assert dynamo["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("ckpt", [False, True])
def test_block_swap_with_levers_is_bit_identical(ckpt):
    """Block swap streams the DiT's weights (the factors stay put): the levers' results are the plain path's."""
    from anima_trainer.models.block_runner import setup_memory
    from tests.support.small_dit import inputs, lora, small_dit
    from tests.support.small_dit import step as swap_step

    results = []
    for levers in (False, True):
        dit = setup_memory(small_dit(torch.bfloat16), device="cpu", blocks_to_swap=2, swap_prefetch=1,
                           gradient_checkpointing=ckpt)
        net = lora(dit)
        with torch.no_grad():
            for p in net.trainable_parameters():
                p.add_(0.01)
        set_fused_qkv(dit, True)
        net.set_speed_levers(cast_factors_once=levers, fuse_qkv_down=False)
        results.append(swap_step(dit, net, *inputs()))
        assert casts_present(net) == (len(net.lora_modules) if levers else 0)
    (out0, grads0), (out1, grads1) = results
    assert torch.equal(out0, out1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1, strict=True))
