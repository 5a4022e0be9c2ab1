"""LoKr/LoHa merged forward (network_args merged_forward, default on): one GEMM with W + multiplier·ΔW gives
the separate path's outputs and gradients (of the factors and of the input): fp32 max |Δ| ≤ 1e-5 · max |ref|,
bf16 ≤ 2e-2 · max |ref| — eager, with fused q/k/v, fp8 base weights, the dropouts (same draws) and compiled
without a recompile per step; the exact fallbacks (network_dropout, multiplier 0, trainable base) run the
separate branch.  Numerics against fp32: bench/merged_forward_numerics.py (docs/performance.md)."""

from __future__ import annotations

import pytest
import torch

from anima_trainer.models import load_dit
from anima_trainer.models.compile import compile_dit_blocks
from anima_trainer.models.fp8 import quantize_fp8
from anima_trainer.models.fp8_compute import Fp8ComputeLinear, enable_fp8_compute
from anima_trainer.networks import NetworkError, create_network
from tests.networks.test_speed_levers import TOL, assert_steps_match, step
from tests.networks.test_speed_levers import make as make_levers

CASES = {"lokr": ("lokr", {}), "lokr-full": ("lokr", {"full_matrix": "true"}),
         "lokr-both": ("lokr", {"decompose_both": "true", "factor": "4"}), "loha": ("loha", {})}


def make(dit_file, case="lokr", dtype=torch.float32, fuse=True, fp8=False, **args):
    algo, kw = CASES[case]
    return make_levers(dit_file, dtype, algo, fuse, prepare=quantize_fp8 if fp8 else None, **kw, **args)


def set_merged(net, on: bool) -> None:
    for m in net.lora_modules:
        m.merged_forward = on


def merged_vs_separate(dit, net, tol, seed=0) -> None:
    set_merged(net, False)
    ref = step(dit, net, seed)
    set_merged(net, True)
    assert_steps_match(step(dit, net, seed), ref, tol)


def test_default_on_for_lokr_and_loha_off_for_lora(dit_file):
    for case in ("lokr", "loha"):
        _, net = make(dit_file, case)
        assert all(m.merged_forward and m.can_merge() for m in net.lora_modules)
    _, net = make(dit_file, "lokr", merged_forward="false")
    assert not any(m.merged_forward for m in net.lora_modules)
    dit = load_dit(dit_file, dtype=torch.float32)
    assert not any(m.merged_forward for m in create_network(dit, "lora").lora_modules)
    with pytest.raises(NetworkError, match="merged_forward is for algo=lokr and algo=loha"):
        create_network(load_dit(dit_file, dtype=torch.float32), "lora", merged_forward="true")
    with pytest.raises(NetworkError, match="merged_forward must be true or false"):
        create_network(load_dit(dit_file, dtype=torch.float32), "lokr", merged_forward="maybe")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fuse", [True, False])
def test_merged_matches_separate_fp32(dit_file, case, fuse):
    dit, net = make(dit_file, case, fuse=fuse)
    merged_vs_separate(dit, net, TOL[torch.float32])


@pytest.mark.parametrize("case", ["lokr", "loha"])
def test_merged_matches_separate_bf16(dit_file, case):
    dit, net = make(dit_file, case, torch.bfloat16)
    merged_vs_separate(dit, net, TOL[torch.bfloat16])


def test_merged_runs_the_fused_qkv_gemm_merged(dit_file, monkeypatch):
    """With fused q/k/v the packed GEMM itself carries the merged ΔW: no branch is added afterwards."""
    from anima_trainer.networks.modules import AdapterModule

    dit, net = make(dit_file)
    added = []
    original = AdapterModule.add_to_output
    monkeypatch.setattr(AdapterModule, "add_to_output", lambda self, out, x: added.append(self.path) or
                        original(self, out, x))
    step(dit, net)
    assert added == []
    set_merged(net, False)
    step(dit, net)
    assert "blocks.0.self_attn.q_proj" in added


def test_fp8_base_merged_matches_separate(dit_file):
    dit, net = make(dit_file, "lokr", torch.bfloat16, fp8=True)
    assert net.modules_by_name["blocks.0.mlp.layer1"].can_merge()
    merged_vs_separate(dit, net, TOL[torch.bfloat16])


def test_fp8_compute_keeps_its_fp8_gemm(dit_file, monkeypatch):
    """A LoKr module on an fp8-compute Linear adds its branch to the fp8 GEMM's output: merging would run the bf16
    GEMM and drop the lever (models/fp8_compute.py)."""
    dit = load_dit(dit_file, dtype=torch.bfloat16)
    converted = enable_fp8_compute(dit)
    net = create_network(dit, "lokr", dim=4, alpha=4.0)
    compute = [m for m in net.lora_modules if isinstance(dit.get_submodule(m.path), Fp8ComputeLinear)]
    assert len(compute) == converted > 0 and not any(m.can_merge() for m in compute)
    calls = []
    original = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or original(*a, **k))
    step(dit, net)
    assert len(calls) >= converted  # every fp8-compute Linear ran its fp8 GEMM under the adapter


@pytest.mark.parametrize("args", [{"rank_dropout": "0.3"}, {"module_dropout": "0.5"}])
def test_dropouts_draw_the_same_masks(dit_file, args):
    dit, net = make(dit_file, **args)
    net.train()
    merged_vs_separate(dit, net, TOL[torch.float32], seed=7)


def test_fallbacks_are_exact(dit_file):
    """network_dropout in training (the base must not see dropped input), multiplier 0 and a trainable base
    run the separate path: bit-identical."""
    dit, net = make(dit_file)
    net.train()
    for m in net.lora_modules:
        m.dropout = 0.2
    assert not any(m.can_merge() for m in net.lora_modules)
    for m in net.lora_modules:
        m.dropout = None
    net.set_multiplier(0.0)
    assert not any(m.can_merge() for m in net.lora_modules)
    net.set_multiplier(1.0)
    linear = dit.get_submodule("blocks.0.mlp.layer1")
    linear.weight.requires_grad_(True)
    assert not net.modules_by_name["blocks.0.mlp.layer1"].can_merge()
    linear.weight.requires_grad_(False)
    net.eval()
    for m in net.lora_modules:
        m.dropout = 0.2  # eval: no dropout, so merging is allowed again
    assert all(m.can_merge() for m in net.lora_modules)



def test_compiled_merged_matches_eager_without_recompiling(dit_file, dynamo):
    dit, net = make(dit_file, "lokr", torch.bfloat16)
    set_merged(net, False)
    ref = [step(dit, net, seed=i) for i in range(3)]
    set_merged(net, True)
    compile_dit_blocks(dit, backend="aot_eager", fullgraph=True, max_shapes=1)
    for i in range(3):
        assert_steps_match(step(dit, net, seed=i), ref[i], TOL[torch.bfloat16])
        if i == 0:
            graphs = dynamo["stats"]["unique_graphs"]
    assert dynamo["stats"]["unique_graphs"] == graphs
