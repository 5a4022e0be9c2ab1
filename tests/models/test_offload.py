"""Block swap and CPU-offloaded checkpointing (models/offload.py) run on CPU with both devices = CPU.

The "device copies" are then real clones, so what is tested is the mechanism a GPU run uses: which blocks are
resident when, the prefetch order forward and backward, the hooks that bring weights back for backward and
recompute, the tokens that stand in for weights in autograd's saved tensors, the parked residuals and their
prefetch, and that outputs, gradients and optimizer steps are identical to a run without any of it.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from anima_trainer.models.block_runner import setup_memory
from anima_trainer.models.fp8 import quantize_fp8
from anima_trainer.models.offload import ActivationOffloader, BlockSwapper, swap_indices
from tests.support.ledger import SavedTensorLedger
from tests.support.small_dit import SMALL, TOL, inputs, lora, max_diff, small_dit, step

N = SMALL.num_blocks


@pytest.fixture(scope="module")
def reference():
    dit = small_dit()
    return step(dit, lora(dit), *inputs())


def swapped_dit(blocks_to_swap: int, prefetch: int = 1, **options):
    dit = setup_memory(small_dit(), device="cpu", blocks_to_swap=blocks_to_swap, swap_prefetch=prefetch, **options)
    dit.runner.swapper.record_events = True
    return dit


@pytest.mark.parametrize("swap, prefetch, options", [
    (1, 1, {}), (3, 1, {}), (N, 1, {}), (N, 0, {}), (N, 2, {}),
    (2, 1, {"gradient_checkpointing": True}),
    (N, 1, {"gradient_checkpointing": True}),
    (N, 1, {"gradient_checkpointing": True, "checkpoint_blocks": 2}),
    (N, 1, {"gradient_checkpointing": True, "checkpoint_mode": "selective", "cpu_offload_checkpointing": True}),
    (3, 2, {"gradient_checkpointing": True, "fp8_base": True}),
])
def test_block_swap_gives_identical_outputs_and_gradients(reference, swap, prefetch, options):
    fp8 = options.pop("fp8_base", False)
    if fp8:  # compare against fp8 without swap
        plain = setup_memory(small_dit(), device="cpu", fp8_base=True)
        reference = step(plain, lora(plain), *inputs())
    dit = swapped_dit(swap, prefetch, fp8_base=fp8, **options)
    out, grads = step(dit, lora(dit), *inputs())
    assert (out - reference[0]).abs().max().item() <= TOL
    assert max_diff(grads, reference[1]) <= TOL
    # with prefetch every block arrives ahead of use; without, each is fetched on demand, forward and backward
    # (except the first, loaded at the start of forward, and the last, which stays for backward)
    assert dit.runner.swapper.stats.sync_loads == (2 * swap - 2 if prefetch == 0 else 0)


def test_residency_and_order_forward_then_backward():
    dit = swapped_dit(N, prefetch=1)
    sw = dit.runner.swapper
    seen = []
    for i, block in enumerate(dit.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, sorted(sw.resident()))))
    net = lora(dit)
    out = dit(*inputs())
    # forward: block i runs with i (active) and i+1 (prefetched) resident, nothing else
    assert seen == [(0, [0, 1]), (1, [1, 2]), (2, [2, 3]), (3, [2, 3])]
    assert sw.resident() == {N - 2, N - 1}  # the blocks backward needs first stay on the device
    for name, p in dit.blocks[0].named_parameters():  # evicted: the Parameter points at the CPU master again
        assert p.data_ptr() == sw._masters[0][name].data_ptr()
    events_forward = list(sw.stats.events)
    out.square().mean().backward()
    backward = sw.stats.events[len(events_forward):]
    loads = [i for what, i in backward if what == "load"]
    evicts = [i for what, i in backward if what == "evict"]
    assert loads == list(range(N - 3, -1, -1))  # reverse order, one block ahead
    assert evicts == list(range(N - 1, 0, -1))  # each block dropped once its backward is done
    assert sw.stats.max_resident == 2 and sw.stats.sync_loads == 0
    assert all(p.grad is not None for p in net.trainable_parameters())


def test_lora_parameters_stay_put_and_optimizer_steps_match():
    """Adapter params of swapped blocks stay on the compute device as the same objects; two AdamW steps give
    the same weights as without swap."""
    results = []
    for swap in (0, N):
        dit = setup_memory(small_dit(), device="cpu", blocks_to_swap=swap, gradient_checkpointing=True)
        net = lora(dit)
        params = net.trainable_parameters()
        ids = [id(p) for p in params]
        opt = torch.optim.AdamW(params, lr=1e-2)
        for _ in range(2):
            out = dit(*inputs())
            out.square().mean().backward()
            opt.step()
            opt.zero_grad()
        assert [id(p) for p in net.trainable_parameters()] == ids
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
        results.append([p.detach().clone() for p in params])
    assert max_diff(results[0], results[1]) <= TOL


def test_swapped_weights_are_not_kept_alive_by_autograd():
    """A non-checkpointed swapped block saves weight tokens: its device copy is freed when evicted."""
    dit = swapped_dit(N, prefetch=1)
    sw = dit.runner.swapper
    copies: dict[int, weakref.ref] = {}

    def remember(i: int) -> None:
        copies.setdefault(i, weakref.ref(sw._copies[i]["self_attn.q_proj.weight"]))

    for i, block in enumerate(dit.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: remember(i))
    lora(dit)
    out = dit(*inputs())
    gc.collect()
    alive = {i for i, r in copies.items() if r() is not None}
    assert alive == {N - 2, N - 1}  # only the blocks kept for backward; block 0 and 1 copies are gone
    out.square().mean().backward()  # tokens resolve to freshly loaded copies
    assert sw.stats.loads == N + N - 2


def test_sampling_without_grad_evicts_every_block_after_use():
    dit = swapped_dit(N)
    lora(dit)
    with torch.no_grad():
        a = dit(*inputs())
        assert dit.runner.swapper.resident() == set()
        b = dit(*inputs())
    assert torch.equal(a, b)
    ref = small_dit()
    lora(ref)
    with torch.no_grad():
        assert (ref(*inputs()) - a).abs().max().item() <= TOL


def test_swapper_accounting_and_pinned_masters():
    dit = small_dit()
    sw = BlockSwapper(dit.blocks, swap_indices(N, 2), "cpu")
    assert sw.swapped == [N - 2, N - 1] and sw.device_bytes() == 0
    per_block = sum(t.numel() * t.element_size() for t in dit.blocks[N - 1].parameters())
    assert sw.block_bytes[N - 1] == per_block
    sw.load(N - 1)
    sw.ensure(N - 1)
    assert sw.resident() == {N - 1} and sw.device_bytes() == per_block
    assert dit.blocks[N - 1].mlp.layer1.weight.data_ptr() == sw._copies[N - 1]["mlp.layer1.weight"].data_ptr()
    sw.evict_all()
    assert sw.device_bytes() == 0
    assert dit.blocks[N - 1].mlp.layer1.weight.data_ptr() == sw._masters[N - 1]["mlp.layer1.weight"].data_ptr()
    with pytest.raises(ValueError, match="blocks_to_swap"):
        swap_indices(N, N + 1)


def test_setup_checks_and_order():
    with pytest.raises(ValueError, match="checkpoint_blocks"):
        setup_memory(small_dit(), device="cpu", gradient_checkpointing=True, checkpoint_blocks=N + 1)
    with pytest.raises(ValueError, match="needs gradient_checkpointing"):
        setup_memory(small_dit(), device="cpu", cpu_offload_checkpointing=True)
    with pytest.raises(ValueError, match="blocks_to_swap"):
        setup_memory(small_dit(), device="cpu", blocks_to_swap=N + 1)
    dit = setup_memory(small_dit(), device="cpu", blocks_to_swap=2)
    with pytest.raises(ValueError, match="before enabling block swap"):
        quantize_fp8(dit)


# ----------------------------------------------------------------------------------- activation offload --
def offload_run(offload: bool, **options):
    dit = setup_memory(small_dit(), device="cpu", gradient_checkpointing=True, cpu_offload_checkpointing=offload,
                       **options)
    net = lora(dit)
    inputs_seen: list[weakref.ref] = []
    for block in dit.blocks:
        block.register_forward_pre_hook(
            lambda m, a: inputs_seen.append(weakref.ref(a[0])) if torch.is_grad_enabled() else None)
    x, t, ctx = inputs()
    with SavedTensorLedger(dit, net, exclude_tensors=dit.rope(1, 8, 8, torch.device("cpu"))) as ledger:
        out = dit(x, t, ctx)
    gc.collect()
    alive = [r() is not None for r in inputs_seen[:N]]
    summary = ledger.summary()
    out.square().mean().backward()
    return dit, net, alive, summary


def test_offloaded_residuals_leave_the_compute_side_and_come_back():
    dit0, _, alive0, plain = offload_run(False)
    dit1, _, alive1, off = offload_run(True)
    residual = 64 * 64 * 4  # fp32 [1, 64 tokens, 64]
    # without offload autograd keeps each block input alive; with it only the parked copies exist
    assert all(alive0) and not any(alive1)
    assert off["offloaded"] == N * residual
    assert plain["total"] - off["total"] == N * residual  # the compute side counts 0 bytes for the residuals
    stats = dit1.runner.offloader.stats
    assert (stats.packed, stats.bytes) == (N, N * residual)
    assert stats.prefetched == N - 1 and stats.sync_fetches == 1  # the last block's input, then one ahead


def test_offloader_only_takes_the_matching_tensor():
    off = ActivationOffloader("cpu")
    a = torch.randn(3, 4, requires_grad=True) * 1.0
    b = torch.randn(3, 4, requires_grad=True)
    with off.hooks(a):
        y = (a * b).sum()  # saves both a and b
    assert off.stats.packed == 1 and off.stats.bytes == a.numel() * 4
    y.backward()
    assert off.stats.sync_fetches == 1 and torch.equal(b.grad, a.detach())
