"""LR schedules: the factor at key steps against hand-computed values (every cosine variant at num_cycles 0.5 /
1.0 / 1.5), warm-up and decay as fractions, custom torch classes, and exact resume through state_dict."""

from __future__ import annotations

import json
import math

import pytest
import torch

from anima_trainer.train.schedulers import build_scheduler, parse_step_rules, resolve_warmup

BASE_LR = 2.0
N, W = 13, 2  # 13 optimizer steps, 2 warm-up steps: decay progress p = (step - 2) / 10, p = 0.5 at step 7


def cos_(p: float, cycles: float) -> float:
    return 0.5 * (1 + math.cos(2 * math.pi * cycles * p))


def run(name: str, steps: int = N, warmup: int | float = W, **kw) -> list[float]:
    """The lr each optimizer step uses (read before the step, as the training loop does), / BASE_LR."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=BASE_LR)
    sched = build_scheduler(opt, name, steps, warmup, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"] / BASE_LR)
        opt.step()
        sched.step()
    return out


WARM = {0: 0.5, 1: 1.0, 2: 1.0}  # (step + 1) / W during the warm-up, then the full lr at decay progress 0
TABLE = [
    ("constant", {}, 0, {0: 1.0, 6: 1.0, 12: 1.0}),
    ("constant_with_warmup", {}, W, {**WARM, 7: 1.0, 12: 1.0}),
    ("linear", {}, W, {**WARM, 7: 0.5, 10: 0.2, 12: 0.0}),
    ("cosine", {"num_cycles": 0.5}, W, {**WARM, 4: cos_(0.2, 0.5), 7: 0.5, 12: 0.0}),
    ("cosine", {"num_cycles": 1.0}, W, {**WARM, 4: cos_(0.2, 1.0), 7: 0.0, 9: cos_(0.7, 1.0), 12: 1.0}),
    ("cosine", {"num_cycles": 1.5}, W, {**WARM, 4: cos_(0.2, 1.5), 5: cos_(0.3, 1.5), 7: 0.5, 12: 0.0}),
    ("cosine_with_min_lr", {"num_cycles": 0.5, "min_lr_ratio": 0.1}, W, {**WARM, 7: 0.55, 12: 0.1}),
    ("cosine_with_min_lr", {"num_cycles": 1.0, "min_lr_ratio": 0.1}, W,
     {**WARM, 4: 0.1 + 0.9 * cos_(0.2, 1.0), 7: 0.1, 12: 1.0}),
    ("cosine_with_min_lr", {"num_cycles": 1.5, "min_lr_ratio": 0.1}, W, {**WARM, 7: 0.55, 12: 0.1}),
    # restarts: the same descents as cosine, each rise replaced by a jump back up (0.5 → 1 descent, 1.0 → 2, ...)
    ("cosine_with_restarts", {"num_cycles": 0.5}, W, {**WARM, 4: cos_(0.2, 0.5), 7: 0.5, 12: 0.0}),
    ("cosine_with_restarts", {"num_cycles": 1.0}, W,
     {**WARM, 4: cos_(0.2, 1.0), 7: 0.0, 8: 1 - cos_(0.6, 1.0), 10: 1 - cos_(0.8, 1.0), 12: 0.0}),
    ("cosine_with_restarts", {"num_cycles": 1.5}, W,
     {**WARM, 5: cos_(0.3, 1.5), 6: 1 - cos_(0.4, 1.5), 7: 0.5, 12: 0.0}),
    # warmup_stable_decay, 5 decay steps (8..12): progress (step - 7) / 5, last stable step 7
    ("warmup_stable_decay", {"decay_steps": 5, "min_lr_ratio": 0.1, "num_cycles": 0.5}, W,
     {**WARM, 7: 1.0, 8: 0.1 + 0.9 * cos_(0.2, 0.5), 10: 0.1 + 0.9 * cos_(0.6, 0.5), 12: 0.1}),
    ("warmup_stable_decay", {"decay_steps": 4, "num_cycles": 1.0}, W, {**WARM, 8: 1.0, 9: 0.5, 10: 0.0, 12: 1.0}),
    ("warmup_stable_decay", {"decay_steps": 6, "num_cycles": 1.5}, W, {**WARM, 6: 1.0, 8: 0.0, 10: 1.0, 12: 0.0}),
    ("polynomial", {"power": 2.0}, W, {**WARM, 7: 0.25, 12: 0.0}),
    ("polynomial", {"power": 2.0, "min_lr_ratio": 0.1}, W, {**WARM, 7: 0.1 + 0.9 * 0.25, 12: 0.1}),
    ("polynomial", {"power": 0.5}, W, {**WARM, 7: math.sqrt(0.5), 12: 0.0}),
    # inverse_sqrt (diffusers): 1 / sqrt((step + timescale - W) / timescale), timescale default = W
    ("inverse_sqrt", {}, W, {**WARM, 7: math.sqrt(2 / 7), 12: math.sqrt(2 / 12)}),
    ("inverse_sqrt", {"timescale": 10}, W, {**WARM, 7: math.sqrt(10 / 15), 12: math.sqrt(10 / 20)}),
    ("inverse_sqrt", {}, 0, {0: 1.0, 12: math.sqrt(10_000 / 10_012)}),
    # piecewise_constant: rule steps are absolute optimizer steps; the warm-up ramps towards the rule's value
    ("piecewise_constant", {"scheduler_args": {"step_rules": "1:5,0.1:10,0.01"}}, W,
     {**WARM, 4: 1.0, 5: 0.1, 9: 0.1, 10: 0.01, 12: 0.01}),
    ("piecewise_constant", {"scheduler_args": {"step_rules": "0.5:3,1"}}, W, {0: 0.25, 1: 0.5, 2: 0.5, 3: 1.0}),
]


@pytest.mark.parametrize("name, kw, warmup, expected", TABLE,
                         ids=[f"{t[0]}-{'-'.join(f'{k}={v}' for k, v in t[1].items())}" for t in TABLE])
def test_lr_at_key_steps(name, kw, warmup, expected):
    lrs = run(name, warmup=warmup, **kw)
    for step, value in expected.items():
        assert lrs[step] == pytest.approx(value, abs=1e-12), (step, lrs)


@pytest.mark.parametrize("name, kw", [("cosine", {}), ("cosine_with_restarts", {}), ("linear", {}),
                                      ("cosine_with_min_lr", {"min_lr_ratio": 0.2}), ("polynomial", {"power": 3.0}),
                                      ("warmup_stable_decay", {"decay_steps": 3, "min_lr_ratio": 0.2})])
def test_default_num_cycles_is_one_descent_ending_on_the_last_step(name, kw):
    for steps, warmup in ((13, 2), (7, 0), (100, 10), (4, 1)):
        lrs = run(name, steps=steps, warmup=warmup, **kw)
        assert lrs[-1] == pytest.approx(kw.get("min_lr_ratio", 0.0), abs=1e-12)
        assert all(a >= b - 1e-12 for a, b in zip(lrs[warmup:], lrs[warmup + 1:], strict=False)), lrs


def test_fractions_of_the_total_steps():
    assert resolve_warmup(0.1, 200) == 20 and resolve_warmup(5, 200) == 5 and resolve_warmup(None, 9) == 0
    lrs = run("warmup_stable_decay", steps=10, warmup=0.2, decay_steps=0.3)  # 2 warm-up, 5 stable, 3 decay steps
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.25, 0.0], abs=1e-12)
    assert run("linear", steps=10, warmup=0.25)[:3] == pytest.approx([0.5, 1.0, 1.0])  # int(2.5) = 2 steps


def test_schedule_errors():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    with pytest.raises(ValueError, match="lr_scheduler: 'cosine_typo' is not one of constant"):
        build_scheduler(opt, "cosine_typo", 10)
    with pytest.raises(ValueError, match=r"lr_warmup_steps \(10\) must be less than the number of optimizer steps"):
        build_scheduler(opt, "cosine", 10, 10)
    with pytest.raises(ValueError, match=r"lr_warmup_steps \+ lr_decay_steps \(4 \+ 7\) exceed"):
        build_scheduler(opt, "warmup_stable_decay", 10, 4, decay_steps=7)
    with pytest.raises(ValueError, match="warmup_stable_decay needs a decay"):
        build_scheduler(opt, "warmup_stable_decay", 10, 2)
    with pytest.raises(ValueError, match="piecewise_constant takes exactly step_rules"):
        build_scheduler(opt, "piecewise_constant", 10)
    with pytest.raises(ValueError, match="the steps must be increasing"):
        parse_step_rules("1:10,0.1:5,0.01")
    with pytest.raises(ValueError, match="every item but the last is factor:step"):
        parse_step_rules("1,0.1:10")
    with pytest.raises(ValueError, match="step_rules is empty"):
        parse_step_rules(" , ")
    assert parse_step_rules("1:10,0.1:20,0.01") == ([(10, 1.0), (20, 0.1)], 0.01)


def test_custom_torch_scheduler_class():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, "constant", 10, scheduler_type="cosineannealinglr",
                            scheduler_args={"T_max": 4, "eta_min": 0.1})
    assert type(sched) is torch.optim.lr_scheduler.CosineAnnealingLR
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=4, eta_min=0.1)
    for _ in range(6):
        assert sched.get_last_lr() == pytest.approx(ref.get_last_lr())
        opt.step(), ref_opt.step(), sched.step(), ref.step()
    step = build_scheduler(opt, "constant", 10, scheduler_type="torch.optim.lr_scheduler.StepLR",
                           scheduler_args={"step_size": 2})
    assert type(step) is torch.optim.lr_scheduler.StepLR
    with pytest.raises(ValueError, match="a warm-up .* cannot be combined with a custom scheduler class"):
        build_scheduler(opt, "constant", 10, 2, scheduler_type="StepLR", scheduler_args={"step_size": 2})
    with pytest.raises(ValueError, match="'StepLRR' is not a learning-rate scheduler class; did you mean 'StepLR'"):
        build_scheduler(opt, "constant", 10, scheduler_type="StepLRR")
    with pytest.raises(ValueError, match="ReduceLROnPlateau is not supported"):
        build_scheduler(opt, "constant", 10, scheduler_type="ReduceLROnPlateau")
    with pytest.raises(ValueError, match=r"StepLR has no argument 'step'; did you mean 'step_size'\? \(StepLR "
                                         r"accepts: step_size, gamma, last_epoch\)"):
        build_scheduler(opt, "constant", 10, scheduler_type="StepLR", scheduler_args={"step": 2})


RESUMABLE = [("cosine", {"num_cycles": 1.5}, 3), ("cosine_with_restarts", {"num_cycles": 1.0}, 2),
             ("warmup_stable_decay", {"decay_steps": 0.4, "min_lr_ratio": 0.1}, 0.1), ("inverse_sqrt", {}, 4),
             ("piecewise_constant", {"scheduler_args": {"step_rules": "1:6,0.3:12,0.1"}}, 2),
             ("constant", {"scheduler_type": "OneCycleLR", "scheduler_args": {"max_lr": 1.0, "total_steps": 20}}, 0)]


@pytest.mark.parametrize("name, kw, warmup", RESUMABLE, ids=[r[0] if "scheduler_type" not in r[1] else "OneCycleLR"
                                                             for r in RESUMABLE])
def test_state_dict_round_trip_continues_identically(name, kw, warmup):
    def fresh():
        p = torch.nn.Parameter(torch.ones(2))
        opt = torch.optim.SGD([{"params": [p], "name": "base"}], lr=0.5, momentum=0.9)
        return opt, build_scheduler(opt, name, 20, warmup, **kw)

    opt, sched = fresh()
    for _ in range(7):
        opt.step()
        sched.step()
    saved = json.loads(json.dumps(sched.state_dict()))  # the resume code stores it as JSON
    opt_saved = opt.state_dict()
    expected = []
    for _ in range(13):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    opt2, sched2 = fresh()
    opt2.load_state_dict(opt_saved)  # as the resume code does: optimizer, then scheduler
    sched2.load_state_dict(saved)
    got = []
    for _ in range(13):
        got.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert got == expected
    assert len(set(expected)) > 1  # the schedule moves in the resumed part


def test_loading_the_schedule_alone_sets_the_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, "linear", 10)
    for _ in range(4):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_scheduler(opt2, "linear", 10)
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(1 - 4 / 9) == sched2.get_last_lr()[0]
