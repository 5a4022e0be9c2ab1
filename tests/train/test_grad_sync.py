"""The gradient average overlapped with the backward (train/grad_sync.py) against the flat one-shot average.

Two spawned gloo processes on the CPU (the launcher of test_distributed.py) run the loop's step on the tiny DiT with a
LoRA (dim 4) in float32 — gradient accumulation 2, clipping, AdamW, a parameter that only one process uses
(in an earlier micro-batch, so its hook never fires in the last backward), one that no process uses, gradient
checkpointing, an Inf in one process — once with buckets started from gradient hooks (small buckets: many of
them) and once with `Distributed.average_gradients`; gradients and weights must be bitwise equal (2 processes:
each element is a + b either way).  The order of the all-reduce launches against the end of each backward
shows that communication starts inside the last backward and never in the earlier ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anima_trainer.train.distributed import Distributed
from anima_trainer.train.grad_sync import DEFAULT_BUCKET_CAP_MB, GradientSync, plan_buckets
from tests.train.test_distributed import run_checks, run_processes

SMALL_BUCKET_MB = 0.004  # 4 KiB: the tiny LoRA spreads over many buckets
STEPS, ACCUM = 2, 2


# ------------------------------------------------------------------------------------- bucket plans --

def test_buckets_follow_the_backward_order_and_the_cap():
    a, b, c = (torch.nn.Parameter(torch.zeros(256)) for _ in range(3))  # 1 KiB each
    half = torch.nn.Parameter(torch.zeros(256, dtype=torch.float16))
    big = torch.nn.Parameter(torch.zeros(1024))  # 4 KiB: over the cap, a bucket of its own
    two_kib = 2 / 1024
    buckets = plan_buckets([a, half, b, big, c], two_kib)
    assert [[id(p) for p in bucket] for bucket in buckets] == [[id(c)], [id(big)], [id(b), id(a)], [id(half)]]
    flat = plan_buckets([a, half, b, big, c], 0)  # the flat path: one bucket per dtype, registration order
    assert [[id(p) for p in bucket] for bucket in flat] == [[id(a), id(b), id(big), id(c)], [id(half)]]


def test_one_process_registers_no_hooks_and_changes_nothing():
    p = torch.nn.Parameter(torch.ones(3))
    with GradientSync([p], world_size=1) as sync:
        assert not sync.overlaps and sync.buckets == []
        with sync.backward(last=True):
            (p * 2).sum().backward()
        sync.finish()
    assert torch.equal(p.grad, torch.full((3,), 2.0))


def test_a_gradient_that_changes_after_its_bucket_started_is_an_error(monkeypatch):
    import anima_trainer.train.grad_sync as grad_sync

    launched = []
    monkeypatch.setattr(grad_sync.tdist, "all_reduce", lambda flat, **kw: launched.append(flat.clone()))
    p = torch.nn.Parameter(torch.ones(3))
    with GradientSync([p], world_size=2) as sync:
        with sync.backward(last=False):  # an earlier micro-batch: no communication
            (p * 2).sum().backward()
        assert launched == []
        with sync.backward(last=True), pytest.raises(RuntimeError, match="ddp_bucket_cap_mb = 0"):
            (p * 3).sum().backward()  # the step's last backward: the bucket starts ...
            assert torch.equal(launched[0], torch.tensor([5.0, 5.0, 5.0, 1.0]))  # gradients + has-a-gradient flag
            (p * 4).sum().backward()  # ... and a second backward would change what it sends


def test_the_default_bucket_size_is_the_option_default():
    from anima_trainer.config.speed_memory_settings import SpeedMemorySettings

    assert SpeedMemorySettings.model_fields["ddp_bucket_cap_mb"].default == DEFAULT_BUCKET_CAP_MB


# ---------------------------------------------------------------------------- the two paths in gloo --

def _model(dit_path: Path, checkpointing: bool):
    from anima_trainer.models import load_dit
    from anima_trainer.models.block_runner import setup_memory
    from anima_trainer.networks import create_network

    dit = load_dit(dit_path, dtype=torch.float32)
    setup_memory(dit, device="cpu", gradient_checkpointing=checkpointing)
    net = create_network(dit, algo="lora", dim=4, alpha=4)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-zero up factors: every factor gets a gradient
        for p in net.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    one_rank = torch.nn.Parameter(torch.randn(3, 5, generator=gen))  # used by rank 1, first micro-batch only
    unused = torch.nn.Parameter(torch.zeros(4))  # no process uses it: its grad stays None
    return dit, [*net.trainable_parameters(), one_rank, unused]


def _batch(rank: int, step: int, micro: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return {"latents": torch.randn(1, 16, 1, 8, 8, generator=gen), "context": torch.randn(1, 512, 64, generator=gen),
            "noise": torch.randn(1, 16, 1, 8, 8, generator=gen),
            "sigma": torch.rand(1, generator=gen).clamp(0.05, 0.95)}


def _train(d: Distributed, dit_path: Path, *, overlap: bool, checkpointing: bool = False, inf_rank: int | None = None,
           calls: list | None = None) -> dict:
    """The loop's step (train/loop.py) for STEPS optimizer steps of ACCUM micro-batches; `calls` records the
    order of all-reduce launches and backward ends."""
    from anima_trainer.train.flow import flow_loss, noisy_input

    torch.manual_seed(0)
    dit, params = _model(dit_path, checkpointing)
    one_rank = params[-2]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    sync = d.gradient_sync(params, SMALL_BUCKET_MB if overlap else 0)
    first_grads, nonfinite = None, []
    for step in range(STEPS):
        for micro in range(ACCUM):
            b = _batch(d.rank, step, micro)
            pred = dit(noisy_input(b["latents"], b["noise"], b["sigma"]), b["sigma"], b["context"])
            loss = flow_loss(pred, b["noise"] - b["latents"], b["sigma"])
            if d.rank == 1 and micro == 0:
                loss = loss + (one_rank ** 2).sum() * 1e-3
            if inf_rank == d.rank and step == 0 and micro == ACCUM - 1:
                loss = loss * float("inf")
            last = micro == ACCUM - 1
            with sync.backward(last=last):
                (loss / ACCUM).backward()
            if calls is not None:
                calls.append(("backward_end", step, micro))
        if overlap:
            sync.finish()
        else:
            d.average_gradients(params)
        if calls is not None:
            calls.append(("finish", step, -1))
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        first_grads = grads if first_grads is None else first_grads
        nonfinite.append(any(g is not None and not torch.isfinite(g).all() for g in grads))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not nonfinite[-1]:  # the monitor's skip: every process skips the same step
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    overlaps = sync.overlaps
    sync.close()
    assert not sync.overlaps and all(not p._post_accumulate_grad_hooks for p in params)  # hooks removed
    return {"grads": first_grads, "weights": [p.detach().clone() for p in params], "nonfinite": nonfinite,
            "buckets": len(sync.buckets), "overlaps": overlaps}


def _recorded(d: Distributed, dit_path: Path, overlap: bool) -> dict:
    """`_train` with the order of its all-reduce launches and backward ends in result["calls"]."""
    import anima_trainer.train.grad_sync as grad_sync

    calls: list = []
    real = grad_sync.tdist.all_reduce

    def recording(tensor, *args, **kwargs):
        calls.append(("all_reduce", tensor.numel()))
        return real(tensor, *args, **kwargs)

    grad_sync.tdist.all_reduce = recording
    try:
        return {**_train(d, dit_path, overlap=overlap, calls=calls), "calls": calls}
    finally:
        grad_sync.tdist.all_reduce = real


def _gloo_checks(d: Distributed, out: Path) -> dict:
    dit_path = out / "tiny_dit.safetensors"
    checks = {
        "plain": lambda: (_recorded(d, dit_path, True), _recorded(d, dit_path, False)),
        "checkpointing": lambda: (_train(d, dit_path, overlap=True, checkpointing=True),
                                  _train(d, dit_path, overlap=False, checkpointing=True)),
        "inf": lambda: (_train(d, dit_path, overlap=True, inf_rank=0), _train(d, dit_path, overlap=False, inf_rank=0)),
    }
    return run_checks(checks)


@pytest.fixture(scope="module")
def gloo(tmp_path_factory) -> list[dict]:
    from anima_trainer.demo import write_tiny_dit

    root = tmp_path_factory.mktemp("grad_sync")
    write_tiny_dit(root / "tiny_dit.safetensors", seed=3)
    return run_processes(_gloo_checks, root)


def _results(gloo: list[dict], name: str) -> list:
    for rank, res in enumerate(gloo):
        if isinstance(res[name], dict) and "error" in res[name]:
            pytest.fail(f"{name} failed in rank {rank}:\n{res[name]['error']}")
    return [res[name] for res in gloo]


def _bits(t: torch.Tensor | None):
    return None if t is None else t.view(torch.int32)


def _bitwise_equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(_bits(x), _bits(y)))
        for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", ["plain", "checkpointing"])
def test_overlapped_buckets_give_the_flat_average_bit_for_bit(gloo, name):
    runs = _results(gloo, name)
    for overlapped, flat in runs:
        assert overlapped["overlaps"] and overlapped["buckets"] > 3 and flat["buckets"] == 1
        assert _bitwise_equal(overlapped["grads"], flat["grads"])
        assert _bitwise_equal(overlapped["weights"], flat["weights"])
        grads = overlapped["grads"]
        assert grads[-1] is None  # no process used it
        assert grads[-2] is not None and grads[-2].abs().sum() > 0  # rank 1's gradient, averaged with rank 0's zeros
        assert all(g.abs().sum() > 0 for g in grads[:-1])
    (r0, _), (r1, _) = runs  # every process holds the same average and the same weights
    assert _bitwise_equal(r0["grads"], r1["grads"]) and _bitwise_equal(r0["weights"], r1["weights"])


def test_an_inf_in_one_process_reaches_every_process_on_both_paths(gloo):
    for overlapped, flat in _results(gloo, "inf"):
        assert overlapped["nonfinite"] == [True, False] == flat["nonfinite"]  # every process skips step 1 only
        assert _bitwise_equal(overlapped["grads"], flat["grads"])
        assert _bitwise_equal(overlapped["weights"], flat["weights"])


def _per_step(calls: list) -> list[list[tuple]]:
    """Each step's calls, ("all_reduce", numel) and ("end", micro-batch) for every backward end, up to its finish."""
    steps, current = [], []
    for c in calls:
        if c[0] == "finish":
            steps.append(current)
            current = []
        else:
            current.append(c if c[0] == "all_reduce" else ("end", c[2]))
    return steps


def _all_reduces(seq: list[tuple]) -> int:
    return sum(1 for c in seq if c[0] == "all_reduce")


def test_communication_starts_inside_the_last_backward_and_never_in_earlier_ones(gloo):
    for overlapped, flat in _results(gloo, "plain"):
        flat_steps = _per_step(flat["calls"])
        for calls, overlap in ((overlapped["calls"], True), (flat["calls"], False)):
            steps = _per_step(calls)
            assert len(steps) == STEPS
            for step, seq in enumerate(steps):
                ends = [i for i, c in enumerate(seq) if c[0] == "end"]
                assert [seq[i][1] for i in ends] == list(range(ACCUM))
                assert _all_reduces(seq[:ends[-2]]) == 0  # the earlier micro-batches' backward: silent
                during_last, after = _all_reduces(seq[ends[-2]:ends[-1]]), _all_reduces(seq[ends[-1]:])
                if overlap and step == 0:  # the unused parameters' bucket (the first) holds the others back
                    assert during_last == 0 and after > 3, seq
                elif overlap:  # after the first step they wait at the end: most buckets start in the backward
                    assert during_last >= 3 and during_last > after, seq
                else:
                    assert (during_last, after) == (0, 1)
                # the same numbers in pieces: the flat buffer's size is the buckets' sizes summed
                assert sum(c[1] for c in seq if c[0] == "all_reduce") == flat_steps[step][-1][1]
