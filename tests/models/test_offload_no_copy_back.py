"""Block swap is host-to-device only (issue 18 item 4): the frozen weights never change, so nothing of a swapped
block is ever copied back to its host master.  Checked over whole optimizer steps (forward, backward with
recompute, AdamW): the master tensors stay the same objects at the same addresses, are never written (their
version counter and values are unchanged), and every copy that touches them reads from them.  (What is copied
back: only the trained parameters of a fine-tune's swapped trained blocks, `swap_trained`, updated by the fused
backward pass; tests/models/test_trained_block_swap.py.)  Masters are pinned
when the compute device is CUDA (async copies need page-locked memory); on the CPU they cannot be."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from anima_trainer.models import offload
from anima_trainer.models.block_runner import setup_memory
from anima_trainer.models.offload import BlockSwapper, swap_indices
from tests.support.small_dit import SMALL, inputs, lora, small_dit

N = SMALL.num_blocks


class MasterAccess(TorchDispatchMode):
    """Counts ops that read a master tensor and ops that write one (an in-place op or out= into it)."""

    def __init__(self, ptrs: set[int]) -> None:
        super().__init__()
        self.ptrs, self.reads, self.writes = ptrs, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        for i, arg in enumerate(schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if isinstance(value, torch.Tensor) and value.data_ptr() in self.ptrs:
                if arg.alias_info is not None and arg.alias_info.is_write:
                    self.writes.append(str(func))
                else:
                    self.reads += 1
        return func(*args, **(kwargs or {}))


def snapshot(sw: BlockSwapper) -> dict:
    return {(i, n): (m, m.data_ptr(), m._version, m.clone()) for i, ms in sw._masters.items() for n, m in ms.items()}


@pytest.mark.parametrize("options", [{}, {"gradient_checkpointing": True},
                                     {"gradient_checkpointing": True, "cpu_offload_checkpointing": True}])
def test_swapped_masters_are_only_read_over_training_steps(options):
    dit = setup_memory(small_dit(), device="cpu", blocks_to_swap=N, **options)
    sw = dit.runner.swapper
    net = lora(dit)
    opt = torch.optim.AdamW(net.trainable_parameters(), lr=1e-2)
    before = snapshot(sw)
    access = MasterAccess({ptr for _, ptr, _, _ in before.values()})
    with access:
        for _ in range(3):
            dit(*inputs()).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    sw.evict_all()
    after = snapshot(sw)
    assert access.writes == []  # no copy_ (or any in-place op) into a master: nothing goes device → host
    assert access.reads >= sw.stats.loads > 0  # the loads read them (the check sees master accesses)
    for key, (master, ptr, version, value) in before.items():
        now, now_ptr, now_version, now_value = after[key]
        assert now is master and now_ptr == ptr and now_version == version, key
        assert torch.equal(now_value, value), key
    for i in sw.swapped:  # evicted: every Parameter points at its unchanged master again
        for name, p in dit.blocks[i].named_parameters():
            assert p.data_ptr() == sw._masters[i][name].data_ptr()


def test_the_check_fails_on_a_copy_back():
    """The same check catches a device → host write-back (what the swapper must never do)."""
    dit = small_dit()
    sw = BlockSwapper(dit.blocks, swap_indices(N, 1), "cpu")
    i = sw.swapped[0]
    before = snapshot(sw)
    access = MasterAccess({ptr for _, ptr, _, _ in before.values()})
    sw.ensure(i)
    with access:
        for n, master in sw._masters[i].items():
            master.copy_(sw._copies[i][n])  # a copy back
    assert access.writes and all("copy_" in w for w in access.writes)
    assert any(m._version != version for m, _, version, _ in before.values())


def test_masters_are_pinned_exactly_when_the_compute_device_is_cuda(monkeypatch):
    pins: list[bool] = []
    real = offload._pin
    monkeypatch.setattr(offload, "_pin", lambda t, pin: (pins.append(pin), real(t, False))[1])
    BlockSwapper(small_dit().blocks, swap_indices(N, 2), "cpu")
    assert pins and not any(pins)  # a CPU "device": nothing to pin (and no CUDA to pin with)
    pins.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    BlockSwapper(small_dit().blocks, swap_indices(N, 2), "cpu", pin_memory=True)
    assert pins and all(pins)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory and H2D streams need CUDA; the "
                                                         "CPU tests above run the same swapper")
def test_on_cuda_masters_are_pinned_and_never_written():
    dit = setup_memory(small_dit(), device="cuda", blocks_to_swap=N, gradient_checkpointing=True)
    sw = dit.runner.swapper
    assert all(m.is_pinned() and m.device.type == "cpu" for ms in sw._masters.values() for m in ms.values())
    net = lora(dit).to("cuda")  # as prepare_dit: the adapter lives on the compute device
    before = snapshot(sw)
    for _ in range(2):
        dit(*(t.cuda() for t in inputs())).square().mean().backward()
        net.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    sw.evict_all()
    for key, (master, ptr, version, value) in before.items():
        now, now_ptr, now_version, now_value = snapshot(sw)[key]
        assert now is master and now_ptr == ptr and now_version == version and torch.equal(now_value, value)
