"""Sharded fine-tuning with FSDP2 (train/fsdp.py) in 2 spawned gloo processes on the CPU (the launcher of
test_distributed.py), on the tiny DiT in float32.

The data split is the data-parallel tests' one: global micro-batch position j·world + r is process r's j-th
micro-batch (`shard_batches`), so 2 processes × 2 accumulated micro-batches of 1 sample see the same 4 samples
per optimizer step as 1 process × 4 accumulated micro-batches.  Every step clips the gradient norm (to a bound
it really exceeds) and steps AdamW.  One process group runs every sharded check (starting processes is the slow
part); the single-process references run in the test process.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from anima_trainer.demo import TINY_DIT_CONFIG
from anima_trainer.models.dit import AnimaDiT
from anima_trainer.train.distributed import Distributed, shard_batches
from anima_trainer.train.fsdp import (
    SHARDED_FOLDER,
    check_trained_dtypes,
    full_state_dict,
    is_sharded,
    load_sharded,
    micro_batch,
    mixed_precision_policy,
    save_sharded,
    shard_dit,
)
from tests.support.small_dit import SMALL, small_dit
from tests.train.test_distributed import run_checks, run_processes

WORLD, ACCUM, STEPS, SAVE_AT = 2, 2, 4, 2
ADAPTER_STEPS = 2
LR, MAX_NORM = 1e-3, 0.05
RTOL = 1e-4  # the criterion; sharded sums run in another order than the single-process ones
ATOL = 1e-7
PARTIAL = r"^blocks\.(2|3)\.|^blocks\.1\.cross_attn\."  # two whole blocks + one sub-module of a third


def _sample(index: int) -> tuple[torch.Tensor, ...]:
    """Global sample `index`: latents, σ, context and the regression target (tiny: 8×8 latents, 16 rows)."""
    g = torch.Generator().manual_seed(100 + index)
    return (torch.randn(1, 16, 1, 8, 8, generator=g), torch.rand(1, generator=g),
            torch.randn(1, 16, SMALL.crossattn_dim, generator=g), torch.randn(1, 16, 1, 8, 8, generator=g))


def _model(pattern: str | None):
    """The tiny DiT with the fine-tune selection `pattern` (None: everything) set trainable."""
    import re

    dit = small_dit()
    for name, p in dit.named_parameters():
        p.requires_grad_(pattern is None or re.search(pattern, name) is not None)
    return dit


def _optimizer(dit) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in dit.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)


def _step(dit, optimizer, step: int, rank: int, world: int) -> float:
    """Optimizer step `step` (0-based) of process `rank`: its ACCUM micro-batches, clip, AdamW; the norm."""
    per_step = world * ACCUM
    positions = shard_batches(STEPS * per_step, rank, world)[step * ACCUM:(step + 1) * ACCUM]
    for j, index in enumerate(positions):
        x, t, ctx, target = _sample(index)
        with micro_batch(dit, last=j == ACCUM - 1):  # FSDP averages the processes' gradients
            ((dit(x, t, ctx) - target).square().mean() / ACCUM).backward()
    params = [p for p in dit.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _reference(pattern: str | None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One process, all WORLD × ACCUM samples of every step accumulated (loss / (WORLD·ACCUM) each); one
    thread like the workers (several threads on a busy 2-core machine cost 20× the time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _single_process_run(pattern)
    finally:
        torch.set_num_threads(threads)


def _single_process_run(pattern: str | None) -> tuple[dict[str, torch.Tensor], list[float]]:
    dit = _model(pattern)
    optimizer = _optimizer(dit)
    norms = []
    for step in range(STEPS):
        for index in range(step * WORLD * ACCUM, (step + 1) * WORLD * ACCUM):
            x, t, ctx, target = _sample(index)
            ((dit(x, t, ctx) - target).square().mean() / (WORLD * ACCUM)).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_([p for p in dit.parameters() if p.requires_grad],
                                                          MAX_NORM)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in dit.state_dict().items()}, norms


# --------------------------------------------------------------------------------- the sharded runs --

def _sharded_run(d: Distributed, out: Path, pattern: str | None, save: bool) -> dict:
    dit = shard_dit(_model(pattern), device="cpu")
    optimizer = _optimizer(dit)
    local = {name: tuple(p.to_local().shape) for name, p in dit.named_parameters()}
    norms = []
    for step in range(STEPS):
        norms.append(_step(dit, optimizer, step, d.rank, d.world_size))
        if save and step + 1 == SAVE_AT:
            save_sharded(out / "state", dit, optimizer)
    trained = {n for n, p in dit.named_parameters() if p.requires_grad}
    return {"full": full_state_dict(dit), "trained_only": sorted(full_state_dict(dit, trained_only=True)),
            "norms": norms, "local_shapes": local, "trained": trained, "sharded": is_sharded(dit.blocks[0]),
            "optimizer_params": sum(len(g["params"]) for g in optimizer.param_groups)}


def _resumed_run(d: Distributed, out: Path) -> dict:
    """A fresh sharded model (other initial weights) and optimizer, resumed from the step-SAVE_AT state."""
    dit = _model(None)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(1.0)  # whatever it starts from, the load must overwrite all of it
    dit = shard_dit(dit, device="cpu")
    optimizer = _optimizer(dit)
    load_sharded(out / "state", dit, optimizer)
    steps_loaded = {float(s["step"]) for s in optimizer.state.values()}
    for step in range(SAVE_AT, STEPS):
        _step(dit, optimizer, step, d.rank, d.world_size)
    return {"full": full_state_dict(dit), "steps_loaded": steps_loaded,
            "files": sorted(p.name for p in (out / "state" / SHARDED_FOLDER).iterdir())}


def _bf16_compute_run(d: Distributed, out: Path) -> dict:
    """The CUDA policy's layout on the CPU: frozen parameters stored bf16 beside fp32 trained ones in one unit,
    all-gathered and computed in bf16, gradients reduced in fp32; one step."""
    dit = _model(PARTIAL)
    for p in dit.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    assert mixed_precision_policy("cuda") == policy and mixed_precision_policy("cpu").param_dtype is None
    dit = shard_dit(dit, device="cpu", mp_policy=policy)
    optimizer = _optimizer(dit)
    norm = _step(dit, optimizer, 0, d.rank, d.world_size)
    return {"full": full_state_dict(dit), "norm": norm}


def _adapter_sample(index: int) -> tuple[torch.Tensor, ...]:
    """Latents, σ, Qwen hidden states and T5 ids for the demo DiT (with an LLM adapter)."""
    g = torch.Generator().manual_seed(200 + index)
    return (torch.randn(1, 16, 1, 8, 8, generator=g), torch.rand(1, generator=g),
            torch.randn(1, 7, TINY_DIT_CONFIG.llm_adapter_source_dim, generator=g),
            torch.randint(0, TINY_DIT_CONFIG.llm_adapter_vocab, (1, 5), generator=g))


def _adapter_run(indices_of_step, divide: int, shard: bool) -> dict[str, torch.Tensor]:
    """ADAPTER_STEPS AdamW steps of the whole demo DiT, the LLM adapter trained through `encode_context`."""
    from anima_trainer.models.dit import AnimaDiT

    torch.manual_seed(0)
    dit = AnimaDiT(TINY_DIT_CONFIG)
    if shard:
        dit = shard_dit(dit, device="cpu")
    optimizer = _optimizer(dit)
    for step in range(ADAPTER_STEPS):
        for index in indices_of_step(step):
            x, t, qwen, t5_ids = _adapter_sample(index)
            (dit(x, t, dit.encode_context(qwen, t5_ids)).square().mean() / divide).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return full_state_dict(dit) if shard else {k: v.detach().clone() for k, v in dit.state_dict().items()}


def _all_runs(d: Distributed, out: Path) -> dict:
    return run_checks({
        "full": lambda: _sharded_run(d, out, None, save=True), "resumed": lambda: _resumed_run(d, out),
        "partial": lambda: _sharded_run(d, out, PARTIAL, save=False), "bf16_compute": lambda: _bf16_compute_run(d, out),
        "adapter": lambda: {"full": _adapter_run(lambda step: [WORLD * step + d.rank], 1, True)}})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    return run_processes(_all_runs, tmp_path_factory.mktemp("fsdp"), world=WORLD)


def _result(runs: list[dict], name: str) -> list[dict]:
    for rank, res in enumerate(r[name] for r in runs):
        if "error" in res:
            pytest.fail(f"{name} failed in rank {rank}:\n{res['error']}")
    return [r[name] for r in runs]


def _max_abs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in b)


# ------------------------------------------------------------------------------------------- tests --

def test_two_sharded_processes_equal_one_process_on_the_global_batch(runs):
    rank0, rank1 = _result(runs, "full")
    reference, ref_norms = _reference(None)
    assert rank0["sharded"] and rank1["full"] == {}  # the full weights are gathered on rank 0 only
    assert rank0["full"].keys() == reference.keys()  # the DiT's own parameter names: the checkpoint keys
    # every parameter is sharded: each process holds half of dim 0 (the tiny DiT's dims are all even)
    full_shapes = {k: tuple(v.shape) for k, v in reference.items()}
    assert rank0["local_shapes"] == {k: (s[0] // 2, *s[1:]) for k, s in full_shapes.items()}
    assert rank0["norms"] == rank1["norms"] and min(ref_norms) > MAX_NORM  # one global norm; it clipped
    torch.testing.assert_close(torch.tensor(rank0["norms"]), torch.tensor(ref_norms), rtol=RTOL, atol=0)
    for k in reference:  # atol: about one float32 ulp of the weights (≈ 0.1); only near-zero weights need it
        torch.testing.assert_close(rank0["full"][k], reference[k], rtol=RTOL, atol=ATOL)
    start = small_dit().state_dict()
    assert all(not torch.equal(rank0["full"][k], start[k]) for k in start)  # every parameter trained
    # and the difference is tiny against what training moved (measured: 1.1e-7 against 4.0e-3)
    assert _max_abs(rank0["full"], reference) < RTOL * _max_abs(reference, start)


def test_a_sharded_run_resumed_from_its_state_equals_the_uninterrupted_run(runs):
    uninterrupted, resumed = _result(runs, "full")[0], _result(runs, "resumed")
    assert resumed[0]["steps_loaded"] == {float(SAVE_AT)}  # AdamW's step counts came back
    assert resumed[0]["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one shard file per process
    for k, v in uninterrupted["full"].items():
        assert torch.equal(resumed[0]["full"][k], v), k  # bitwise


def test_a_partial_selection_trains_exactly_the_selected_parameters(runs):
    import re

    rank0 = _result(runs, "partial")[0]
    start = small_dit().state_dict()
    selected = {k for k in start if re.search(PARTIAL, k)}
    assert rank0["trained"] == selected and rank0["optimizer_params"] == len(selected)
    assert rank0["trained_only"] == sorted(selected)
    changed = {k for k in start if not torch.equal(rank0["full"][k], start[k])}
    assert changed == selected  # frozen blocks, frozen parts of block 1 and the root: bitwise untouched
    reference, _ = _reference(PARTIAL)
    for k in selected:
        torch.testing.assert_close(rank0["full"][k], reference[k], rtol=RTOL, atol=ATOL)


def test_the_llm_adapter_trains_sharded_through_encode_context(runs):
    sharded = _result(runs, "adapter")[0]["full"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = _adapter_run(lambda step: range(WORLD * step, WORLD * (step + 1)), WORLD, False)
    finally:
        torch.set_num_threads(threads)
    assert sharded.keys() == reference.keys() and any(k.startswith("llm_adapter.") for k in reference)
    for k in reference:
        torch.testing.assert_close(sharded[k], reference[k], rtol=RTOL, atol=ATOL)
    torch.manual_seed(0)
    start = AnimaDiT(TINY_DIT_CONFIG).state_dict()
    assert all(not torch.equal(sharded[k], start[k]) for k in start if k.startswith("llm_adapter."))


def test_frozen_bf16_and_trained_fp32_share_a_unit_under_bf16_compute(runs):
    import re

    rank0 = _result(runs, "bf16_compute")[0]
    start = small_dit().state_dict()
    assert math.isfinite(rank0["norm"]) and rank0["norm"] > 0
    for k, v in rank0["full"].items():
        if re.search(PARTIAL, k):  # the fp32 master copy stepped
            assert v.dtype == torch.float32 and not torch.equal(v, start[k]), k
        else:  # stored bf16, untouched
            assert v.dtype == torch.bfloat16 and torch.equal(v, start[k].to(torch.bfloat16)), k


# ------------------------------------------------------------------------------------ refusals --

def test_one_unit_training_two_dtypes_is_refused_naming_the_unit():
    dit = _model(PARTIAL)
    dit.blocks[2].mlp.layer1.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"FSDP unit blocks\.2 trains parameters of several dtypes"):
        check_trained_dtypes(dit)
    dit.blocks[0].mlp.layer1.to(torch.bfloat16)  # frozen parameters may have any dtype
    dit.blocks[2].mlp.layer1.to(torch.float32)
    check_trained_dtypes(dit)


def test_block_swap_cannot_be_sharded():
    dit = _model(None)
    dit.runner.swapper = object()  # any swapper: refused before anything is sharded
    with pytest.raises(ValueError, match="blocks_to_swap and activation offload cannot be combined"):
        shard_dit(dit, device="cpu")
    assert not is_sharded(dit)
