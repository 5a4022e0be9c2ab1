"""Block swap and fp8 storage in a partial fine-tune (issue 19 item 2): without `swap_trained` only the blocks
holding no trained parameter swap (host → device only, masters never written, as in LoRA training); the trained
blocks stay on the device (with it they swap too: tests/models/test_trained_block_swap.py); a trained Linear is
never stored in fp8.  The same mechanism checks as the LoRA swap tests
(tests/models/test_offload_no_copy_back.py) on the small DiT."""

from __future__ import annotations

import pytest
import torch

from anima_trainer.models.block_runner import frozen_blocks, frozen_fp8_targets, setup_memory
from anima_trainer.models.fp8 import Fp8Linear, fp8_targets
from anima_trainer.models.offload import swap_indices
from anima_trainer.networks.full_finetune import DiTFinetune
from tests.models.test_offload_no_copy_back import MasterAccess, snapshot
from tests.support.small_dit import SMALL, inputs, small_dit

N = SMALL.num_blocks
PATTERN = r"^blocks\.[12]\."  # blocks 1 and 2 train; 0 and 3 are frozen


def _trained(dit) -> set[str]:
    return {n for n, _ in dit.named_parameters() if n.startswith(("blocks.1.", "blocks.2."))}


def _train(options: dict, steps: int = 3):
    """A partial fine-tune of the small DiT (fp32, AdamW) with the memory `options`; returns the DiT, the
    fine-tune, the swapper's master snapshot (or None), the master-access record and the trained tensors'
    storage addresses before and after."""
    dit = small_dit()
    dit = setup_memory(dit, device="cpu", trained=_trained(dit), **options)
    ft = DiTFinetune(dit, trainable_patterns=[PATTERN])
    opt = torch.optim.AdamW(ft.trainable_parameters(), lr=1e-2)
    sw = dit.runner.swapper
    before = snapshot(sw) if sw is not None else {}
    access = MasterAccess({ptr for _, ptr, _, _ in before.values()})
    ptrs = [p.data_ptr() for p in ft.trainable_parameters()]
    with access:
        for _ in range(steps):
            dit(*inputs()).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    if sw is not None:
        sw.evict_all()
    return dit, ft, before, access, (ptrs, [p.data_ptr() for p in ft.trainable_parameters()])


def test_swap_candidates_are_the_frozen_blocks():
    dit = small_dit()
    assert frozen_blocks(N, _trained(dit)) == [0, 3]
    assert swap_indices(N, 1, [0, 3]) == [3] and swap_indices(N, 2, [0, 3]) == [0, 3]
    with pytest.raises(ValueError, match=r"blocks_to_swap = 3: only 2 of this DiT's 4 blocks may swap"):
        swap_indices(N, 3, [0, 3])
    with pytest.raises(ValueError, match="only 2 of this DiT's 4 blocks"):  # setup_memory refuses it too
        setup_memory(dit, device="cpu", blocks_to_swap=3, trained=_trained(dit))


@pytest.mark.parametrize("options", [{}, {"gradient_checkpointing": True},
                                     {"gradient_checkpointing": True, "cpu_offload_checkpointing": True}])
def test_swapping_the_frozen_blocks_trains_the_same_weights(options):
    plain, plain_ft, *_ = _train(options)
    dit, ft, before, access, (ptrs, ptrs_after) = _train({**options, "blocks_to_swap": 2})
    sw = dit.runner.swapper
    assert sw.swapped == [0, 3] and sw.stats.loads > 0
    # bitwise the same trained model (fp32)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), dit.state_dict().values(), strict=True))
    assert plain_ft.parameter_count() == ft.parameter_count() > 0
    # the trained blocks stay resident: the swapper holds none of their tensors, and the optimizer updated the
    # same storages in place every step
    swapped_tensors = {id(t) for named in sw._tensors.values() for t in named.values()}
    assert not any(id(p) in swapped_tensors for p in ft.trainable_parameters())
    assert ptrs == ptrs_after
    # frozen host masters: only read, never written, unchanged
    after = snapshot(sw)
    assert access.writes == [] and access.reads >= sw.stats.loads
    for key, (master, ptr, version, value) in before.items():
        now, now_ptr, now_version, now_value = after[key]
        assert now is master and now_ptr == ptr and now_version == version and torch.equal(now_value, value), key


def test_fp8_storage_leaves_every_trained_linear_alone():
    dit = small_dit()
    trained = _trained(dit)
    setup_memory(dit, device="cpu", fp8_base=True, trained=trained)
    targets = fp8_targets(dit)
    fp8 = {path for path, m in targets.items() if isinstance(m, Fp8Linear)}
    assert fp8 == set(frozen_fp8_targets(dit, trained)) and fp8  # the frozen blocks' attention/MLP Linears
    assert all(p.startswith(("blocks.0.", "blocks.3.")) for p in fp8)
    assert {p for p in targets if p.startswith(("blocks.1.", "blocks.2."))}.isdisjoint(fp8)
    ft = DiTFinetune(dit, trainable_patterns=[PATTERN])
    assert {p.dtype for p in ft.trainable_parameters()} == {torch.float32}


def test_fp8_partial_finetune_trains_close_to_the_full_precision_run():
    """fp8 storage of the frozen blocks changes the result a little (the frozen weights are rounded): the loss
    of each step stays within 5 % of the full-precision run's (the stated tolerance), and the trained tensors
    stay fp32."""
    losses = {}
    for fp8 in (False, True):
        dit = small_dit()
        setup_memory(dit, device="cpu", fp8_base=fp8, trained=_trained(dit))
        ft = DiTFinetune(dit, trainable_patterns=[PATTERN])
        opt = torch.optim.AdamW(ft.trainable_parameters(), lr=1e-2)
        losses[fp8] = []
        for _ in range(4):
            loss = dit(*inputs()).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[fp8].append(loss.item())
        assert {p.dtype for p in ft.trainable_parameters()} == {torch.float32}
    assert losses[True] != losses[False]  # fp8 did act
    for a, b in zip(losses[False], losses[True], strict=True):
        assert abs(a - b) <= 0.05 * abs(a), (losses[False], losses[True])
    assert losses[True][-1] < losses[True][0]  # and it trains
