"""LR schedules: kohya's curves step for step (transformers' schedule functions called as kohya's get_scheduler_fix
calls them, for every scheduler x num_cycles 0.5/1/2/3 x warm-up), sd-scripts-anima's num_cycles meaning, the
start-up line and notices, custom torch classes, exact resume through state_dict, and the scheduler options'
validation at config time and at the run's start-up (train/optim.py check_optimization)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers.optimization as tro

from anima_trainer.config import parse_train_args
from anima_trainer.config.schedule_rules import parse_step_rules
from anima_trainer.train.optim import build_optimizer
from anima_trainer.train.schedulers import (
    build_scheduler,
    describe_schedule,
    resolve_warmup,
)
from tests.train.test_optim import REQUIRED, checked, error

BASE_LR = 2.0


def cos_(p: float, cycles: float) -> float:
    return 0.5 * (1 + math.cos(2 * math.pi * cycles * p))


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)


def curve(opt: torch.optim.Optimizer, sched, steps: int) -> list[float]:
    """The lr each optimizer step uses (read before the step, as kohya's loop and ours do), / BASE_LR."""
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"] / BASE_LR)
        opt.step()
        sched.step()
    return out


def run(name: str, steps: int = 13, warmup: int | float = 2, **kw) -> list[float]:
    opt = _opt()
    return curve(opt, build_scheduler(opt, name, steps, warmup, **kw), steps)


def kohya_reference(name: str, steps: int, warmup: int | float, num_cycles: float, *, power: float = 1.0,
                    min_lr_ratio: float = 0.0, decay: int | float = 0, timescale: int | None = None) -> list[float]:
    """transformers' schedule with the arguments kohya v0.11.1 `get_scheduler_fix` passes (one process)."""
    opt = _opt()
    w = int(warmup * steps) if isinstance(warmup, float) else warmup
    d = int(decay * steps) if isinstance(decay, float) else decay
    fn = tro.TYPE_TO_SCHEDULER_FUNCTION[tro.SchedulerType(name)]
    if name == "constant":
        s = fn(opt)
    elif name == "constant_with_warmup":
        s = fn(opt, num_warmup_steps=w)
    elif name == "inverse_sqrt":
        s = fn(opt, num_warmup_steps=w, timescale=timescale)
    elif name == "cosine_with_restarts":
        s = fn(opt, num_warmup_steps=w, num_training_steps=steps, num_cycles=num_cycles)
    elif name == "polynomial":
        s = fn(opt, num_warmup_steps=w, num_training_steps=steps, power=power)
    elif name == "cosine_with_min_lr":
        s = fn(opt, num_warmup_steps=w, num_training_steps=steps, num_cycles=num_cycles / 2, min_lr_rate=min_lr_ratio)
    elif name in ("linear", "cosine"):
        s = fn(opt, num_warmup_steps=w, num_training_steps=steps)
    else:  # warmup_stable_decay
        s = fn(opt, num_warmup_steps=w, num_stable_steps=steps - w - d, num_decay_steps=d, num_cycles=num_cycles / 2,
               min_lr_ratio=min_lr_ratio)
    return curve(opt, s, steps)


KOHYA = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
         "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"]
EXTRA = {"polynomial": {"power": 2.0}, "cosine_with_min_lr": {"min_lr_ratio": 0.1},
         "warmup_stable_decay": {"min_lr_ratio": 0.1, "decay": 0.4}, "inverse_sqrt": {"timescale": 7}}


@pytest.mark.parametrize("warmup", [0, 3, 0.1])
@pytest.mark.parametrize("num_cycles", [0.5, 1, 2, 3])
@pytest.mark.parametrize("name", KOHYA)
def test_same_curve_as_kohya_step_by_step(name, num_cycles, warmup):
    if name == "constant" and warmup:
        pytest.raises(ValueError, run, name, 40, warmup)  # kohya refuses it too
        return
    kw = dict(EXTRA.get(name, {}))
    ours = run(name, 40, warmup, num_cycles=num_cycles, **{("decay_steps" if k == "decay" else k): v
                                                             for k, v in kw.items()})
    assert ours == pytest.approx(kohya_reference(name, 40, warmup, num_cycles, **kw), abs=1e-12)


def test_hand_computed_kohya_values():
    # 12 steps, warm-up 2: progress p = (step - 2) / 10
    lrs = run("cosine_with_min_lr", 12, 2, num_cycles=1, min_lr_ratio=0.1)  # kohya halves 1 → 0.5 periods
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0]) and lrs[7] == pytest.approx(0.55)
    assert lrs[11] == pytest.approx(0.1 + 0.9 * cos_(0.9, 0.5))  # one step short of the end: above 0.1
    assert run("cosine", 12, 2, num_cycles=3) == run("cosine", 12, 2, num_cycles=1)  # kohya ignores it
    restarts = run("cosine_with_restarts", 12, 2, num_cycles=2)  # two descents, restart at p = 0.5 (step 7)
    assert restarts[7] == 1.0 and restarts[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.8)))


def test_sd_scripts_anima_num_cycles_counts_periods():
    # sd-scripts-anima documents 0.5 as one descent ending at the minimum (kohya's halving gave 0.56 x lr)
    ours = run("cosine_with_min_lr", 100, 0, num_cycles=0.5, min_lr_ratio=0.1, sd_scripts_anima=True)
    kohya = run("cosine_with_min_lr", 100, 0, num_cycles=0.5, min_lr_ratio=0.1)
    assert ours[-1] == pytest.approx(0.1 + 0.9 * cos_(0.99, 0.5)) and ours[-1] < 0.1003
    assert kohya[-1] == pytest.approx(0.1 + 0.9 * cos_(0.99, 0.25)) and kohya[-1] > 0.55
    assert run("cosine", 20, 0, num_cycles=1.0, sd_scripts_anima=True)[10] == pytest.approx(0.0)  # down, up


def test_fractions_of_the_total_steps():
    assert resolve_warmup(0.1, 200) == 20 and resolve_warmup(5, 200) == 5 and resolve_warmup(None, 9) == 0
    lrs = run("warmup_stable_decay", steps=10, warmup=0.2, decay_steps=0.3)  # 2 warm-up, 5 stable, 3 decay steps
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.25], abs=1e-12)
    assert run("linear", steps=10, warmup=0.25)[:3] == pytest.approx([0.0, 0.5, 1.0])  # int(2.5) = 2 steps


def test_piecewise_constant_ignores_the_warm_up_like_kohya():
    lrs = run("piecewise_constant", 12, 2, scheduler_args={"step_rules": "1:5,0.1:10,0.01"})
    assert lrs == [1.0] * 5 + [0.1] * 5 + [0.01] * 2


def test_start_up_line_and_never_reaching_the_minimum():
    opt = _opt()
    s = build_scheduler(opt, "cosine_with_min_lr", 100, 10, num_cycles=0.5, min_lr_ratio=0.1)
    line, notice = describe_schedule(s, "cosine_with_min_lr", 100, 1e-4, min_lr_ratio=0.1)
    end = 1e-4 * (0.1 + 0.9 * cos_(89 / 90, 0.25))
    assert line == f"lr schedule: cosine_with_min_lr, 100 steps: start 0, peak 0.0001 (step 10), end {end:.3g}, " \
                   "1 descent"
    assert notice is not None and notice.startswith(f"lr never reaches its minimum (1e-05): it ends at {end:.3g}")
    s = build_scheduler(_opt(), "cosine_with_restarts", 100, 0, num_cycles=3)
    line, notice = describe_schedule(s, "cosine_with_restarts", 100, 1.0)
    assert line.endswith("3 descents") and notice is None


def test_schedule_errors():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    with pytest.raises(ValueError, match="lr_scheduler: 'cosine_typo' is not one of constant"):
        build_scheduler(opt, "cosine_typo", 10)
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
    assert opt2.param_groups[0]["lr"] == pytest.approx(1 - 4 / 10) == sched2.get_last_lr()[0]  # (10 - 4) / 10


@pytest.mark.parametrize("name", ["cosine", "linear", "constant_with_warmup", "cosine_with_restarts"])
def test_a_warm_up_longer_than_the_run_is_accepted_with_a_notice(name):
    """kohya (transformers' schedules) accepts lr_warmup_steps >= the run's steps: the whole run is warm-up
    (lr = lr·step/warmup), and the start-up report says the lr never reaches its peak."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, name, 3, 100)
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.0, 0.01, 0.02])
    _, notice = describe_schedule(build_scheduler(torch.optim.SGD([p], lr=1.0), name, 3, 100), name, 3, 1.0)
    assert notice == ("lr_warmup_steps: the warm-up is not shorter than the run's 3 optimizer steps: the lr rises "
                      "to 0.02 and never reaches 1 (kohya accepts this too); lower lr_warmup_steps to train at the "
                      "full rate")


def test_schedules_and_warmup():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([p], 1.0, {"weight_decay": "0.0", "betas": "(0.9, 0.99)"})
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["weight_decay"] == 0.0
    sched = build_scheduler(opt, "cosine", max_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # kohya's (transformers') warm-up starts at 0: i / W, then the cosine from step W
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.5)
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert resolve_warmup(0.1, 200) == 20 and resolve_warmup(5, 200) == 5 and resolve_warmup(None, 9) == 0
    with pytest.raises(ValueError, match="lr_scheduler"):
        build_scheduler(opt, "cosine_with_restarts_typo", 10)


def test_scheduler_options_in_config(tmp_path, caplog):
    c = parse_train_args([*REQUIRED, "--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_num_cycles", "1.5",
                          "--lr_scheduler_min_lr_ratio", "0.1", "--lr_warmup_steps", "10%"])
    assert (c.lr_scheduler_num_cycles, c.lr_scheduler_min_lr_ratio, c.lr_warmup_steps) == (1.5, 0.1, 0.1)
    assert parse_train_args([*REQUIRED, "--lr_scheduler", "cosine", "--lr_scheduler_num_cycles", "50%"]) \
        .lr_scheduler_num_cycles == 0.5
    c = parse_train_args([*REQUIRED, "--lr_scheduler", "warmup_stable_decay", "--lr_decay_steps", "20%",
                          "--lr_scheduler_min_lr_ratio", "0.05"])
    assert (c.lr_decay_steps, c.lr_scheduler_min_lr_ratio) == (0.2, 0.05)
    toml = tmp_path / "t.toml"
    # a GUI-written TOML lists every option with kohya's "unset"/default values: accepted
    toml.write_text('lr_scheduler = "polynomial"\nlr_scheduler_power = 2\nlr_scheduler_num_cycles = 1\n'
                    'lr_scheduler_timescale = ""\nlr_scheduler_min_lr_ratio = ""\nlr_scheduler_type = ""\n'
                    'lr_scheduler_args = ""\nlr_decay_steps = 0\n')
    c = parse_train_args([*REQUIRED, "--config_file", str(toml)])
    assert (c.lr_scheduler_power, c.lr_scheduler_timescale, c.lr_scheduler_type, c.lr_scheduler_args) == \
        (2.0, None, None, {})
    toml.write_text('lr_scheduler = "cosine_with_restarts"\nlr_scheduler_num_cycles = 1.5\n')
    assert parse_train_args([*REQUIRED, "--config_file", str(toml)]).lr_scheduler_num_cycles == 1.5
    # options kohya ignores for the chosen scheduler: accepted, one notice each (kohya's meaning of num_cycles)
    assert parse_train_args([*REQUIRED, "--lr_scheduler", "cosine", "--lr_scheduler_num_cycles", "3"]).notices == [
        "lr_scheduler_num_cycles = 3: kohya's cosine is always one descent to the minimum (it does not pass "
        "num_cycles); use cosine_with_restarts or cosine_with_min_lr for more"]
    assert parse_train_args([*REQUIRED, "--lr_scheduler", "linear", "--lr_scheduler_power", "2"]).notices == [
        "lr_scheduler_power = 2.0: not used by lr_scheduler 'linear' (kohya ignores it too); no effect"]
    c = parse_train_args([*REQUIRED, "--lr_scheduler", "cosine", "--lr_scheduler_min_lr_ratio", "0.1",
                          "--lr_decay_steps", "10"])
    assert [n.split(":")[0] for n in c.notices] == ["lr_scheduler_min_lr_ratio = 0.1", "lr_decay_steps = 10"]
    assert error(["--lr_scheduler", "warmup_stable_decay"]) == \
        "lr_decay_steps: warmup_stable_decay needs a decay (steps, or a fraction < 1)"
    # with max_train_steps (no epochs) the schedule is built once at start-up
    assert error(["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "0.5", "--lr_decay_steps", "60",
                  "--max_train_steps", "100"]) == \
        "lr_warmup_steps + lr_decay_steps (50 + 60) exceed the number of optimizer steps (100)"
    assert parse_train_args([*REQUIRED, "--lr_scheduler", "cosine", "--lr_warmup_steps", "100", "--max_train_epochs",
                             "1"]).lr_warmup_steps == 100  # epochs: the step count is only known with the data
    assert error(["--lr_scheduler_num_cycles", "0"]) == "lr_scheduler_num_cycles: must be > 0.0, got '0'"
    assert error(["--lr_scheduler", "piecewise_constant"]).startswith(
        "lr_scheduler_args: piecewise_constant needs exactly step_rules=")
    assert error(["--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules=1:x,0.1"]).startswith(
        "lr_scheduler_args: step_rules '1:x,0.1': expected 'factor:step,...,factor'")
    c = parse_train_args([*REQUIRED, "--lr_scheduler", "piecewise_constant", "--lr_scheduler_args",
                          "step_rules=1:10,0.1:20,0.01"])
    assert c.lr_scheduler_args == {"step_rules": "1:10,0.1:20,0.01"}


def test_custom_scheduler_class_in_config():
    c = parse_train_args([*REQUIRED, "--lr_scheduler_type", "cosineannealinglr", "--lr_scheduler_args", "T_max=100"])
    assert c.lr_scheduler_type == "cosineannealinglr"  # the class is resolved at start-up (no torch in config)
    c = checked(["--lr_scheduler_type", "cosineannealinglr", "--lr_scheduler_args", "T_max=100"])
    assert (c.lr_scheduler_type, c.lr_scheduler_args) == ("torch.optim.lr_scheduler.CosineAnnealingLR",
                                                          {"T_max": 100})
    assert error(["--lr_scheduler_type", "StepLR", "--lr_warmup_steps", "5", "--lr_scheduler",
                  "constant_with_warmup"]).startswith("lr_scheduler_type: replaces lr_scheduler")
    assert error(["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=2", "--lr_warmup_steps",
                  "5"]) == \
        "lr_scheduler_type: a custom scheduler class has no warm-up; set lr_warmup_steps = 0 (as kohya)"
    assert error(["--lr_scheduler_type", "CosineAnnealingLR", "--lr_scheduler_args", "T_mx=3"]).startswith(
        "lr_scheduler_args: CosineAnnealingLR has no argument 'T_mx'; did you mean 'T_max'?")
    assert error(["--lr_scheduler_type", "OneCycleLR", "--lr_scheduler_args", "max_lr=1.0"]).startswith(
        "lr_scheduler_args: OneCycleLR rejects {'max_lr': 1.0}: You must define either total_steps OR")
    assert error(["--lr_scheduler_type", "NoSuchLR"]).startswith(
        "lr_scheduler_type: 'NoSuchLR' is not a learning-rate scheduler class")
    assert error(["--lr_scheduler_args", "T_max=3"]).startswith(
        "lr_scheduler_args: not used by lr_scheduler 'constant' (only by piecewise_constant and lr_scheduler_type)")
