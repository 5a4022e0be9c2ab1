"""Learning-rate schedules: kohya's `--lr_scheduler` names, one shared definition of every cosine variant.

Conventions (docs/training.md, "Learning-rate schedules"):
- `factor(step)` multiplies each group's base lr; `step` counts optimizer steps from 0 to `max_steps - 1`.
- Warm-up is linear: step i < W uses (i + 1) / W, so step W - 1 is at the full lr (and nothing is spent at 0).
- Decay runs from the first step after the warm-up (progress 0, full lr) to the LAST step (progress 1), so every
  decaying schedule reaches its end value on the last optimizer step.
- `num_cycles` counts cosine periods over the decay: ½·(1 + cos(2π·num_cycles·progress)).  0.5 is one descent
  ending at the minimum on the last step; 1.0 goes down and back up; 1.5 down, up and down again.  The same
  definition holds for cosine, cosine_with_min_lr and warmup_stable_decay's decay; cosine_with_restarts follows
  the same descents but replaces every rise by a hard restart (so 2·num_cycles descents).
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

COSINE_SCHEDULERS = ("cosine", "cosine_with_restarts", "cosine_with_min_lr", "warmup_stable_decay")
# which optional settings each scheduler reads (anything else set to a non-default value is a config error)
USES: dict[str, tuple[str, ...]] = {
    "num_cycles": COSINE_SCHEDULERS,
    "power": ("polynomial",),
    "min_lr_ratio": ("cosine_with_min_lr", "warmup_stable_decay", "polynomial"),
    "decay_steps": ("warmup_stable_decay",),
    "timescale": ("inverse_sqrt",),
    "scheduler_args": ("piecewise_constant",),
}
DEFAULT_TIMESCALE = 10_000  # inverse_sqrt without warm-up or lr_scheduler_timescale (diffusers' default)


def resolve_warmup(warmup: int | float | None, max_steps: int) -> int:
    """kohya semantics: an int is steps, a float < 1 is a fraction of the total steps (also for lr_decay_steps)."""
    if not warmup:
        return 0
    if isinstance(warmup, float) and warmup < 1:
        return int(warmup * max_steps)
    return int(warmup)


def cosine_value(progress: float, num_cycles: float) -> float:
    """½·(1 + cos(2π·num_cycles·progress)) ∈ [0, 1]: 1 at progress 0; 0 at progress 1 when num_cycles is 0.5."""
    return 0.5 * (1.0 + math.cos(2.0 * math.pi * num_cycles * progress))


def restart_value(progress: float, num_cycles: float) -> float:
    """Like `cosine_value`, but each rise is replaced by a jump back to 1: 2·num_cycles descents, every one
    reaching 0 at its own last step (the next step restarts at 1)."""
    x = 2.0 * num_cycles * progress  # descents done so far
    if x <= 0:
        return 1.0
    local = x - (math.ceil(x) - 1)  # in (0, 1]: 1 exactly at the end of a descent
    return 0.5 * (1.0 + math.cos(math.pi * local))


def parse_step_rules(rules: str) -> tuple[list[tuple[int, float]], float]:
    """diffusers' piecewise_constant syntax "1:10,0.1:20,0.01": factor 1 before step 10, 0.1 before step 20,
    then 0.01.  Returns the sorted (end step, factor) pairs and the last factor."""
    parts = [p.strip() for p in str(rules).split(",") if p.strip()]
    if not parts:
        raise ConfigError("step_rules is empty; expected e.g. \"1:100,0.1:200,0.01\"")
    pairs: list[tuple[int, float]] = []
    try:
        for p in parts[:-1]:
            value, step = p.split(":")
            pairs.append((int(step), float(value)))
        last = float(parts[-1])
    except ValueError:
        raise ConfigError(f"step_rules {rules!r}: expected 'factor:step,...,factor' (e.g. \"1:100,0.1:200,0.01\"); "
                         "every item but the last is factor:step, the last is a factor alone") from None
    steps = [s for s, _ in pairs]
    if steps != sorted(steps) or len(set(steps)) != len(steps) or any(s < 1 for s in steps):
        raise ConfigError(f"step_rules {rules!r}: the steps must be increasing and >= 1")
    return pairs, last


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


def _factor(name: str, max_steps: int, warmup: int, *, num_cycles: float, power: float, min_lr_ratio: float,
            decay_steps: int, timescale: int | None, rules: tuple[list[tuple[int, float]], float] | None
            ) -> Callable[[int], float]:
    """The multiplier of the base lr at each optimizer step."""
    end = max_steps - 1  # the last step, where decaying schedules reach their end value
    # progress 0 (full lr) is the first step after the warm-up; for warmup_stable_decay it is the last stable step,
    # so that all `decay_steps` steps are below the full lr and the last one is at the minimum
    decay_start = end - decay_steps if name == "warmup_stable_decay" else warmup
    span = max(1, end - decay_start)
    r = min_lr_ratio
    ts = timescale or warmup or DEFAULT_TIMESCALE

    def shape(step: int) -> float:
        p = min(1.0, max(0.0, (step - decay_start) / span))
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        if name == "linear":
            return 1.0 - p
        if name == "polynomial":
            return r + (1.0 - r) * (1.0 - p) ** power
        if name in ("cosine", "cosine_with_min_lr"):
            return r + (1.0 - r) * cosine_value(p, num_cycles)
        if name == "cosine_with_restarts":
            return restart_value(p, num_cycles)
        if name == "warmup_stable_decay":
            return 1.0 if step <= decay_start else r + (1.0 - r) * cosine_value(p, num_cycles)
        if name == "inverse_sqrt":
            return 1.0 / math.sqrt((max(step, warmup) + ts - warmup) / ts)
        if name == "piecewise_constant":
            assert rules is not None
            return next((v for s, v in rules[0] if step < s), rules[1])
        raise AssertionError(name)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup * (shape(step) if name == "piecewise_constant" else 1.0)
        return shape(step)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, max_steps: int, warmup_steps: int | float = 0, *,
                    num_cycles: float = 0.5, power: float = 1.0, min_lr_ratio: float = 0.0,
                    decay_steps: int | float = 0, timescale: int | None = None, scheduler_type: str | None = None,
                    scheduler_args: dict[str, Any] | None = None) -> LRScheduler:
    """The schedule for `max_steps` OPTIMIZER steps (the caller divides by gradient accumulation).

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
    if warmup and warmup >= max_steps:
        raise ConfigError(f"lr_warmup_steps ({warmup}) must be less than the number of optimizer steps ({max_steps})")
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
    factor = _factor(name, max_steps, warmup, num_cycles=num_cycles, power=power, min_lr_ratio=min_lr_ratio,
                     decay_steps=decay, timescale=timescale, rules=rules)
    return Schedule(optimizer, factor)


def schedule_options(cfg: Any) -> dict[str, Any]:
    """build_scheduler's keyword arguments from a TrainConfig: `build_scheduler(opt, cfg.lr_scheduler, max_steps,
    **schedule_options(cfg))`."""
    return {"warmup_steps": cfg.lr_warmup_steps, "num_cycles": cfg.lr_scheduler_num_cycles,
            "power": cfg.lr_scheduler_power, "min_lr_ratio": cfg.lr_scheduler_min_lr_ratio,
            "decay_steps": cfg.lr_decay_steps, "timescale": cfg.lr_scheduler_timescale,
            "scheduler_type": cfg.lr_scheduler_type, "scheduler_args": cfg.lr_scheduler_args}


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
