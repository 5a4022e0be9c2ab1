"""blocks_to_swap for the trained blocks of a fine-tune (kohya's swap in anima_train.py): with the fused backward
pass a swapped trained block is updated on the device while it is resident in backward, then copied back to its
host master before eviction.  Checked on the small DiT (device = CPU: the swapper's copies are real clones, so the
scheduling, hooks, deferral and copies back all run): the weights equal a run without swap bit for bit (fp32 and
compensated bf16 with its int16 remainders, optimizer state on the device or offloaded), the host masters hold
the updated values after every step, and a trained block is never evicted before its update."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import anima_trainer.train.loop as loop
from anima_trainer.config import ConfigError
from anima_trainer.evaluation.strength import at_strength
from anima_trainer.demo import write_demo_models, write_shapes_dataset
from anima_trainer.models.block_runner import setup_memory
from anima_trainer.networks.full_finetune import DiTFinetune, select_parameters
from anima_trainer.train.bf16_update import REMAINDER_KEY
from anima_trainer.train.flow import preservation_term
from anima_trainer.train.fused_backward import build_per_parameter_optimizer
from anima_trainer.train.optimizer_offload import OffloadedOptimizer
from tests.support.killed_run import killed_after
from tests.support.small_dit import SMALL, inputs, small_dit
from tests.train.test_finetune_optimizer_levers import _config  # the fine-tune's train.toml, batches of one

N = SMALL.num_blocks


def _fine_tune(dtype: torch.dtype, swap: int, *, offload: bool = False, compensated: bool = False, **memory):
    """A whole-DiT fine-tune of the small DiT with the fused backward pass (AdamW) and `swap` trained blocks."""
    dit = small_dit(dtype)
    trained = set(select_parameters(dit))
    dit = setup_memory(dit, device="cpu", trained=trained, blocks_to_swap=swap, swap_trained=bool(swap), **memory)
    ft = DiTFinetune(dit)
    kind = {"kind": OffloadedOptimizer, "host": "cpu"} if offload else {}
    opt = build_per_parameter_optimizer(ft.param_groups(1e-2), 1e-2, None, torch.device("cpu"),
                                        bf16_update="compensated" if compensated else None, **kind)
    opt.attach()
    return dit, ft, opt


def _steps(dit, opt, steps: int, dtype: torch.dtype, after_step=None) -> None:
    for k in range(steps):
        x, t, ctx = inputs(lat=8, rows=64)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = dit(x.to(dtype), t, ctx.to(dtype)).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(k)


def _weights(dit) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in dit.named_parameters()}


@pytest.mark.parametrize("memory", [{}, {"gradient_checkpointing": True}])
def test_swapped_trained_blocks_train_bit_identically_and_their_masters_follow(memory):
    ref_dit, _, ref_opt = _fine_tune(torch.float32, 0, **memory)
    _steps(ref_dit, ref_opt, 3, torch.float32)
    dit, _, opt = _fine_tune(torch.float32, N - 1, **memory)
    sw = dit.runner.swapper
    assert sw.swapped == list(range(1, N)) and set(sw.updated) == set(sw.swapped)

    def masters_hold_the_update(k: int) -> None:
        # after each step: every trained parameter of a swapped block equals its host master (not stale)
        for i in sw.swapped:
            for name, p in dit.blocks[i].named_parameters():
                assert torch.equal(sw._masters[i][name], p.detach()), (k, i, name)
        assert not sw._deferred and not sw._dirty

    before = {i: {n: m.clone() for n, m in sw._masters[i].items()} for i in sw.swapped}
    _steps(dit, opt, 3, torch.float32, masters_hold_the_update)
    assert sw.stats.writebacks >= 3 * len(sw.swapped) and sw.stats.loads > 0
    assert all(not torch.equal(before[i][n], sw._masters[i][n]) for i in sw.swapped for n in sw.updated[i])
    ref, got = _weights(ref_dit), _weights(dit)
    assert all(torch.equal(ref[n], got[n]) for n in ref)
    sw.evict_all()
    assert all(torch.equal(ref[n], got) for n, got in _weights(dit).items())


@pytest.mark.parametrize("offload", [False, True], ids=["state-on-device", "state-offloaded"])
def test_compensated_bf16_with_swapped_trained_blocks_equals_no_swap(offload):
    """mixed bf16 (bf16 weights, compensated updates): the weights and the int16 remainders equal the run
    without swap bitwise, the whole optimizer state too, with the state on the device or offloaded."""
    runs = []
    for swap in (0, N):
        dit, _, opt = _fine_tune(torch.bfloat16, swap, offload=offload, compensated=True,
                                 gradient_checkpointing=True)
        _steps(dit, opt, 3, torch.bfloat16)
        runs.append((_weights(dit), opt.state_dict()["state"], dit.runner.swapper))
    (ref, ref_state, _), (got, got_state, sw) = runs
    assert sw.swapped == list(range(N)) and sw.stats.writebacks >= 3 * N
    assert all(t.dtype == torch.bfloat16 and torch.equal(ref[n], t) for n, t in got.items())
    assert ref_state.keys() == got_state.keys() and ref_state
    for i, entry in ref_state.items():
        assert entry[REMAINDER_KEY].dtype == torch.int16
        assert entry.keys() == got_state[i].keys() and all(torch.equal(torch.as_tensor(v), torch.as_tensor(
            got_state[i][k])) for k, v in entry.items()), i


def test_a_trained_block_is_evicted_only_after_all_its_updates():
    """The schedule never evicts a trained block whose parameters are not all updated yet: it stays resident
    (deferred) and goes once they are, copied back first; an update that never came (the optimizer is not fused,
    its gradient still waits) is an error naming fused_backward_pass, not a silently lost update."""
    dit, ft, opt = _fine_tune(torch.float32, 2)
    sw = dit.runner.swapper
    sw.begin_forward(training=True)
    i = sw.swapped[0]
    sw.ensure(i)
    sw._release(i)  # backward is done with block i, but none of its parameters has been updated yet
    assert i in sw._deferred and i in sw.resident() and sw.stats.writebacks == 0
    updated = {}
    for name in sw.updated[i][:-1]:
        sw._gradient_arrived(i)
        updated[name] = sw._tensors[i][name].data.add_(1.0).clone()  # stands for the fused update on the device
    sw._release(i)  # one update still missing: still resident
    assert i in sw._deferred and i in sw.resident()
    sw._gradient_arrived(i)
    last = sw.updated[i][-1]
    updated[last] = sw._tensors[i][last].data.add_(1.0).clone()
    sw._release(i)  # (a later scheduling point) all updated: copied back, evicted
    assert i not in sw.resident() and not sw._deferred and sw.stats.writebacks == 1
    for name, value in updated.items():
        p, master = sw._tensors[i][name], sw._masters[i][name]
        assert p.data_ptr() == master.data_ptr() and torch.equal(master, value), name

    dit, ft, opt = _fine_tune(torch.float32, 2)
    opt.detach()  # unfused: the updates would come after backward, when the blocks are back on the host
    x, t, ctx = inputs()
    with pytest.raises(RuntimeError, match=r"still holds its gradient .*fused_backward_pass"):
        dit(x, t, ctx).square().mean().backward()


# ------------------------------------------------------------------------------------------- in the loop --
@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trainswap")
    return {"models": write_demo_models(root / "models", seed=3),
            "images": write_shapes_dataset(root / "images", count=4, seed=3)}


def test_without_the_fused_pass_swapping_trained_blocks_is_refused_with_the_fix(setup, tmp_path):
    cfg = _config(setup, tmp_path, toml_extra="blocks_to_swap = 1\n")
    with pytest.raises(ConfigError) as err:
        loop.run_training(cfg)
    msg = str(err.value)
    assert "blocks_to_swap = 1: only 0 of the DiT's 2 blocks are frozen" in msg
    assert "add fused_backward_pass = true, or set blocks_to_swap = 0 or less" in msg
    assert "(in train.toml line " in msg  # the user's file and line


@pytest.mark.parametrize("levers", [("--fused_backward_pass", "--gradient_checkpointing", "--ema_decay", "0.9"),
                                    ("--mixed_precision", "bf16", "--fused_backward_pass", "--optimizer_offload")],
                         ids=["fused-fp32", "bf16-fused-offloaded"])
def test_a_run_swapping_its_trained_blocks_equals_no_swap_and_resumes_exactly(setup, tmp_path, monkeypatch, levers):
    """A user's defaults (no overwrite, max_grad_norm 1: per-tensor clipping) with the fused pass and
    blocks_to_swap = 2 (both blocks of the tiny DiT, both trained): the weights equal the run without swap
    bitwise (and the EMA, which reads and swaps the trained weights between steps, with them); killed during step
    3 after the step-2 state and resumed, the run ends with the same weights."""
    extra = ("--save_every_n_steps", "2", "--save_state", "--lr_scheduler", "linear", *levers)
    plain = loop.run_training(_config(setup, tmp_path / "plain", *extra, steps=4, defaults=True))
    swap = ("--blocks_to_swap", "2", *extra)
    reference = loop.run_training(_config(setup, tmp_path / "ref", *swap, steps=4, defaults=True))
    sw = reference.dit.runner.swapper
    assert sw.swapped == [0, 1] and set(sw.updated) == {0, 1} and sw.stats.writebacks > 0
    for i in sw.swapped:  # the host masters hold the final weights
        for name, p in reference.dit.blocks[i].named_parameters():
            assert torch.equal(sw._masters[i][name], p.detach()), (i, name)
    a, b = load_file(plain.final_path), load_file(reference.final_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if "--ema_decay" in levers:
        ema_a, ema_b = (load_file(r.final_path.with_name(f"{r.final_path.stem}-ema.safetensors"))
                        for r in (plain, reference))
        assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
        assert any(not torch.equal(ema_b[k], b[k]) for k in b if k.startswith("net.blocks."))
    with killed_after(monkeypatch, 2):  # killed during step 3, after the step-2 state
        loop.run_training(_config(setup, tmp_path / "cut", *swap, steps=4, defaults=True))
    resumed = loop.run_training(_config(setup, tmp_path / "cut", "--resume", "latest", *swap, steps=4,
                                        defaults=True))
    assert resumed.steps == reference.steps == 4
    got = load_file(resumed.final_path)
    assert got.keys() == b.keys() and all(torch.equal(b[k], got[k]) for k in b)


def test_a_selected_parameter_left_frozen_is_not_waited_for():
    """A selected parameter at lr 0 (kohya's mod_lr = 0) does not train: the swapper drops it from the block's
    updated list at the first training forward and the run trains as without swap."""
    runs = []
    for swap in (0, 1):
        dit, ft, opt = _fine_tune(torch.float32, swap)
        for name, p in dit.named_parameters():
            if ".adaln_modulation" in name:
                p.requires_grad_(False)
        _steps(dit, opt, 2, torch.float32)
        runs.append((_weights(dit), dit.runner.swapper))
    (ref, _), (got, sw) = runs
    assert sw.swapped == [N - 1] and sw.updated[N - 1] and sw.stats.writebacks >= 2
    assert not any("adaln_modulation" in n for n in sw.updated[N - 1])
    assert all(torch.equal(ref[n], got[n]) for n in ref)


def test_a_fine_tune_at_another_strength_reaches_its_swapped_trained_blocks():
    """set_multiplier (a measurement at strength m between steps; the preservation loss's base forward in the
    middle of a step, when the last blocks are kept on the device for backward) replaces the trained tensors'
    `.data`: swapped blocks run with the replacement and training goes on exactly as without swap."""
    runs = []
    for swap in (0, N):
        dit, ft, opt = _fine_tune(torch.float32, swap, gradient_checkpointing=True)
        x, t, ctx = inputs(lat=8, rows=64)
        outs = []
        for _ in range(2):
            (dit(x, t, ctx).square().mean() + preservation_term(dit, ft, x, t, ctx)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad(), at_strength(ft, 0.5):
                outs.append(dit(x, t, ctx))
        with torch.no_grad(), at_strength(ft, 0.0):
            outs.append(dit(x, t, ctx))
        runs.append((_weights(dit), outs, dit.runner.swapper))
    (ref, ref_outs, _), (got, got_outs, sw) = runs
    assert sw.swapped == list(range(N)) and not sw._outside
    assert all(torch.equal(ref[n], got[n]) for n in ref)
    assert all(torch.equal(a, b) for a, b in zip(ref_outs, got_outs, strict=True))
    with torch.no_grad():
        base = small_dit()(x, t, ctx)
    assert torch.equal(got_outs[-1], base) and not torch.equal(got_outs[0], base)  # strength 0 is the base model
    for i in sw.swapped:  # back at strength 1: the parameters are the masters again, holding the trained weights
        for name in sw.updated[i]:
            p = sw._tensors[i][name]
            assert p.data_ptr() == sw._masters[i][name].data_ptr()
            assert torch.equal(p.detach(), got[f"blocks.{i}.{name}"])


def test_weights_written_in_place_after_a_forward_without_backward_are_kept():
    """A training forward whose backward never runs (a step skipped for a NaN loss) leaves the last trained
    blocks on the device; weights written in place after it (the EMA's swap for a preview) reach the next forward
    and the host masters, as without swap."""
    runs = []
    for swap in (0, N):
        dit, ft, opt = _fine_tune(torch.float32, swap)
        x, t, ctx = inputs(lat=8, rows=64)
        dit(x, t, ctx)  # abandoned: no backward
        with torch.no_grad():
            for p in ft.trainable_parameters():
                p.mul_(0.5)
            out = dit(x, t, ctx)
        _steps(dit, opt, 1, torch.float32)
        runs.append((_weights(dit), out, dit.runner.swapper))
    (ref, ref_out, _), (got, got_out, sw) = runs
    assert torch.equal(ref_out, got_out) and all(torch.equal(ref[n], got[n]) for n in ref)
    assert not sw.resident() and all(torch.equal(sw._masters[i][n], got[f"blocks.{i}.{n}"])
                                     for i in sw.swapped for n in sw.updated[i])
