"""Learning-rate schedules: kohya's `--lr_scheduler` names, with the curves kohya gets from transformers.

kohya (`get_scheduler_fix`) builds every named schedule with transformers' (piecewise_constant: diffusers')
schedule functions; anima-trainer computes the same multipliers step for step (tests/train/test_schedulers.py
compares them with transformers for every scheduler, num_cycles and warm-up):
- `factor(step)` multiplies each group's base lr; `step` counts optimizer steps from 0 (the first step) to
  `max_steps - 1`.  A warm-up of W steps is linear from 0: step i < W uses i / W (kohya's first step has lr 0).
- The decay runs from step W (full lr, progress 0) towards step `max_steps` (progress 1), which is one past the
  last step: a cosine therefore ends just above its minimum, as in kohya.
- `lr_scheduler_num_cycles` keeps kohya's meaning (`kohya_cycles`): the number of restarts of
  cosine_with_restarts; halved into cosine periods for cosine_with_min_lr and warmup_stable_decay (1 = one descent
  to the minimum); not used by cosine (always one descent).  A config written for sd-scripts-anima keeps its
  documented meaning: cosine periods for cosine, cosine_with_min_lr and warmup_stable_decay (0.5 = one descent).
- polynomial ends at `min_lr_ratio` when set, else at transformers' lr_end = 1e-7 (absolute, as kohya).
- piecewise_constant ignores a warm-up, as kohya does.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from anima_trainer.config.errors import ConfigError, did_you_mean
from anima_trainer.config.kohya_options import KOHYA_SCHEDULERS as SCHEDULERS
from anima_trainer.config.schedule_rules import parse_step_rules

DEFAULT_TIMESCALE = 10_000  # inverse_sqrt without warm-up or lr_scheduler_timescale (diffusers' default)


def resolve_warmup(warmup: int | float | None, max_steps: int) -> int:
    """kohya semantics: an int is steps, a float < 1 is a fraction of the total steps (also for lr_decay_steps)."""
    if not warmup:
        return 0
    if isinstance(warmup, float) and warmup < 1:
        return int(warmup * max_steps)
    return int(warmup)


def cosine_periods(name: str, num_cycles: float, sd_scripts_anima: bool = False) -> float:
    """The cosine periods over the decay that `lr_scheduler_num_cycles` asks of scheduler `name` (kohya's meaning,
    or sd-scripts-anima's for its configs); for cosine_with_restarts: the number of restarts."""
    if name == "cosine_with_restarts":
        return num_cycles
    if sd_scripts_anima and name in ("cosine", "cosine_with_min_lr", "warmup_stable_decay"):
        return num_cycles
    if name in ("cosine_with_min_lr", "warmup_stable_decay"):
        return num_cycles / 2
    return 0.5  # cosine: kohya does not pass num_cycles (transformers' default, one descent)


def cosine_value(progress: float, periods: float) -> float:
    """½·(1 + cos(2π·periods·progress)) ∈ [0, 1]: 1 at progress 0; 0 at progress 1 when periods is 0.5."""
    return 0.5 * (1.0 + math.cos(2.0 * math.pi * periods * progress))


class Schedule(LambdaLR):
    """A LambdaLR whose `load_state_dict` also puts the restored step's lr into the optimizer, so that a fresh
    scheduler loaded from a state dict continues identically even before the optimizer state is loaded."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self.get_last_lr(), strict=True):
            group["lr"] = lr


class AdafactorLR(LRScheduler):
    """kohya's `adafactor` scheduler: Adafactor with relative_step=True computes its own step size; this only
    reports it (get_last_lr) so logging works.  The written group lr is not read by Adafactor in that mode."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float = 0.0, last_epoch: int = -1) -> None:
        self.initial_lr = initial_lr
        for group in optimizer.param_groups:
            if group.get("lr") is None:
                group["lr"] = initial_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        out = []
        for group in self.optimizer.param_groups:
            state = next((self.optimizer.state[p] for p in group["params"] if self.optimizer.state.get(p)), None)
            if state and "step" in state and hasattr(self.optimizer, "_get_lr"):
                out.append(float(self.optimizer._get_lr(group, state)))
            else:
                out.append(self.initial_lr)
        return out


def _factor(name: str, max_steps: int, warmup: int, *, periods: float, power: float, min_lr_ratio: float,
            decay_steps: int, timescale: int | None, rules: tuple[list[tuple[int, float]], float] | None,
            lr_init: float) -> Callable[[int], float]:
    """The multiplier of the base lr at each optimizer step (transformers' formulas, as kohya calls them)."""
    total, r = max_steps, min_lr_ratio
    span = max(1, total - warmup)
    ts = timescale or warmup or DEFAULT_TIMESCALE
    lr_end_ratio = r if r else min(1.0, POLYNOMIAL_LR_END / lr_init) if lr_init > 0 else 0.0
    stable_end = total - decay_steps  # warmup_stable_decay: warm-up, then stable until the decay starts

    def factor(step: int) -> float:
        if name == "piecewise_constant":
            assert rules is not None
            return next((v for s, v in rules[0] if step < s), rules[1])
        if name == "constant":
            return 1.0
        if name == "warmup_stable_decay":
            if step < warmup:
                return max(0.0, step / max(1, warmup) * (1.0 - r) + r)
            if step < stable_end:
                return 1.0
            if step < total:
                p = (step - stable_end) / max(1, decay_steps)
                return max(0.0, cosine_value(p, periods) * (1.0 - r) + r)
            return r
        if step < warmup:
            return step / max(1, warmup)
        p = (step - warmup) / span
        if name == "constant_with_warmup":
            return 1.0
        if name == "linear":
            return max(0.0, (total - step) / span)
        if name == "cosine":
            return max(0.0, cosine_value(p, periods))
        if name == "cosine_with_min_lr":
            return max(0.0, cosine_value(p, periods) * (1.0 - r) + r)
        if name == "cosine_with_restarts":
            if p >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((periods * p) % 1.0))))
        if name == "polynomial":
            if step > total:
                return lr_end_ratio
            return (1.0 - lr_end_ratio) * (1.0 - p) ** power + lr_end_ratio
        if name == "inverse_sqrt":
            return 1.0 / math.sqrt((step + ts - warmup) / ts)
        raise AssertionError(name)

    return factor


POLYNOMIAL_LR_END = 1e-7  # transformers' get_polynomial_decay_schedule_with_warmup default, which kohya keeps


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, max_steps: int, warmup_steps: int | float = 0, *,
                    num_cycles: float = 1.0, power: float = 1.0, min_lr_ratio: float = 0.0,
                    decay_steps: int | float = 0, timescale: int | None = None, scheduler_type: str | None = None,
                    scheduler_args: dict[str, Any] | None = None, sd_scripts_anima: bool = False) -> LRScheduler:
    """The schedule for `max_steps` OPTIMIZER steps (the caller divides by gradient accumulation).

    `num_cycles`: kohya's lr_scheduler_num_cycles (module docstring); `sd_scripts_anima`: its meaning instead.

    `warmup_steps` / `decay_steps`: steps, or a fraction < 1 of `max_steps`.  `scheduler_type` (kohya's
    lr_scheduler_type) builds any torch.optim.lr_scheduler class or dotted path with `scheduler_args` instead;
    `name` is then ignored and a warm-up is an error.  The result's state_dict round-trips (exact resume).
    """
    if max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
    warmup = resolve_warmup(warmup_steps, max_steps)
    decay = resolve_warmup(decay_steps, max_steps)
    args = dict(scheduler_args or {})
    if scheduler_type:
        if warmup:
            raise ConfigError("lr_scheduler_type: a warm-up (lr_warmup_steps) cannot be combined with a custom "
                             "scheduler class; set lr_warmup_steps = 0")
        cls = resolve_scheduler_class(scheduler_type)
        check_scheduler_args(cls, args)
        try:
            return cls(optimizer, **args)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"lr_scheduler_args: {cls.__name__} rejects {args}: {e}") from None
    if name not in SCHEDULERS:
        raise ConfigError(f"lr_scheduler: {name!r} is not one of {', '.join(SCHEDULERS)}")
    if name == "adafactor":
        return AdafactorLR(optimizer)
    if name == "constant" and warmup:
        raise ConfigError("lr_warmup_steps: the 'constant' scheduler has no warm-up (kohya refuses it too); use "
                          "lr_scheduler = \"constant_with_warmup\" or lr_warmup_steps = 0")
    # warmup >= max_steps: kohya (transformers' schedules) accepts it and the run ends in warm-up;
    # describe_schedule's start-up notice says so
    if name == "warmup_stable_decay":
        if decay < 1:
            raise ConfigError("lr_decay_steps: warmup_stable_decay needs a decay (steps, or a fraction < 1)")
        if warmup + decay > max_steps:
            raise ConfigError(f"lr_warmup_steps + lr_decay_steps ({warmup} + {decay}) exceed the number of optimizer "
                             f"steps ({max_steps})")
    rules = None
    if name == "piecewise_constant":
        unknown = set(args) - {"step_rules"}
        if unknown or "step_rules" not in args:
            raise ConfigError("lr_scheduler_args: piecewise_constant takes exactly step_rules=\"1:100,0.1:200,0.01\" "
                             f"(got {sorted(args)})")
        rules = parse_step_rules(args["step_rules"])
    factor = _factor(name, max_steps, warmup, periods=cosine_periods(name, num_cycles, sd_scripts_anima),
                     power=power, min_lr_ratio=min_lr_ratio, decay_steps=decay, timescale=timescale, rules=rules,
                     lr_init=float(optimizer.defaults.get("lr") or 0.0))
    return Schedule(optimizer, factor)


def schedule_options(cfg: Any) -> dict[str, Any]:
    """build_scheduler's keyword arguments from a TrainConfig: `build_scheduler(opt, cfg.lr_scheduler, max_steps,
    **schedule_options(cfg))`."""
    return {"warmup_steps": cfg.lr_warmup_steps, "num_cycles": cfg.lr_scheduler_num_cycles,
            "power": cfg.lr_scheduler_power, "min_lr_ratio": cfg.lr_scheduler_min_lr_ratio,
            "decay_steps": cfg.lr_decay_steps, "timescale": cfg.lr_scheduler_timescale,
            "scheduler_type": cfg.lr_scheduler_type, "scheduler_args": cfg.lr_scheduler_args,
            "sd_scripts_anima": bool(getattr(cfg, "sd_scripts_anima", False))}


def resolve_scheduler_class(path: str) -> type[LRScheduler]:
    """kohya's lr_scheduler_type: a class of torch.optim.lr_scheduler (case-insensitive) or `module.Class`."""
    module_name, _, cls_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name or "torch.optim.lr_scheduler")
    except ImportError as e:
        raise ConfigError(f"lr_scheduler_type: cannot import {module_name!r} ({e})") from None
    classes = {n: c for n, c in vars(module).items() if inspect.isclass(c) and issubclass(c, LRScheduler)}
    cls = classes.get(cls_name) or next((c for n, c in classes.items() if n.lower() == cls_name.lower()), None)
    if cls is None:
        raise ConfigError(f"lr_scheduler_type: {path!r} is not a learning-rate scheduler class"
                         f"{did_you_mean(cls_name, classes)}")
    if issubclass(cls, torch.optim.lr_scheduler.ReduceLROnPlateau) or cls.__name__.startswith("_"):
        raise ConfigError(f"lr_scheduler_type: {cls.__name__} is not supported (it needs a metric or other "
                         "schedulers at each step)")
    return cls


def check_scheduler_args(cls: type, args: dict[str, Any]) -> None:
    """Every key must be a parameter of the class's __init__ (the optimizer comes from the trainer)."""
    params = inspect.signature(cls.__init__).parameters
    accepted = [n for n, p in params.items() if n not in ("self", "optimizer")
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    for k in args:
        if k not in accepted:
            raise ConfigError(f"lr_scheduler_args: {cls.__name__} has no argument {k!r}{did_you_mean(k, accepted)} "
                             f"({cls.__name__} accepts: {', '.join(accepted) or 'nothing'})")


# --- start-up report ----------------------------------------------------------------------------------------
_ENDS_AT_MINIMUM = ("linear", "cosine", "cosine_with_restarts", "cosine_with_min_lr", "warmup_stable_decay",
                    "polynomial")
def describe_schedule(scheduler: LRScheduler, name: str, max_steps: int, base_lr: float, *,
                      min_lr_ratio: float = 0.0) -> tuple[str, str | None]:
    """One line for the start-up report (start, peak and end lr, number of descents) and a notice when a
    decaying schedule never reaches its minimum (e.g. kohya's cosine_with_min_lr with num_cycles 0.5)."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not isinstance(scheduler, Schedule) or not lambdas:
        return f"lr schedule: {type(scheduler).__name__} over {max_steps} steps (its own curve)", None
    f = lambdas[0]
    stride = max(1, max_steps // 20_000)  # a very long run is sampled; descents are long anyway
    steps = [*range(0, max_steps, stride), max_steps - 1]
    values = [f(i) for i in steps]
    descents, falling = 0, False
    for a, b in zip(values, values[1:], strict=False):
        if b < a - 1e-12:
            descents += 0 if falling else 1
            falling = True
        elif b > a + 1e-12:
            falling = False
    peak = max(values)
    line = (f"lr schedule: {name}, {max_steps} steps: start {values[0] * base_lr:.3g}, peak {peak * base_lr:.3g} "
            f"(step {steps[values.index(peak)]}), end {values[-1] * base_lr:.3g}, "
            f"{descents} descent{'s' if descents != 1 else ''}")
    notice = None
    if peak < 1.0 - 1e-9 and values[-1] >= peak - 1e-12 and name not in ("constant", "adafactor"):
        return line, (f"lr_warmup_steps: the warm-up is not shorter than the run's {max_steps} optimizer steps: "
                      f"the lr rises to {peak * base_lr:.3g} and never reaches {base_lr:.3g} (kohya accepts this "
                      "too); lower lr_warmup_steps to train at the full rate")
    floor = min_lr_ratio if name in ("cosine_with_min_lr", "warmup_stable_decay", "polynomial") else 0.0
    if name == "polynomial" and not min_lr_ratio:
        floor = POLYNOMIAL_LR_END / base_lr if base_lr > 0 else 0.0
    lowest = min(values[values.index(peak):])  # after the warm-up
    if name in _ENDS_AT_MINIMUM and lowest - floor > 0.05 * max(peak - floor, 1e-12):
        notice = (f"lr never reaches its minimum ({floor * base_lr:.3g}): it ends at {values[-1] * base_lr:.3g}"
                  + (" (kohya halves lr_scheduler_num_cycles for this scheduler: 1 is one descent to the minimum)"
                     if name in ("cosine_with_min_lr", "warmup_stable_decay") else ""))
    return line, notice
