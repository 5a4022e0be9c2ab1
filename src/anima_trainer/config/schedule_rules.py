"""Which LR-schedule settings each kohya scheduler reads, the start-up notices for those it does not, and the
syntax of piecewise_constant's step_rules.

Why in config: both are decided from the settings alone (no torch, no scheduler is built) — the notices by the
loader right after validation, the step_rules syntax by TrainConfig's validation (config/optimizer_rules.py);
train/schedulers.py, which builds the schedules, imports the same table and parser."""

from __future__ import annotations

from typing import Any

from anima_trainer.config.errors import ConfigError

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

_OPTIONS = {"lr_scheduler_num_cycles": ("num_cycles", (1, 1.0)), "lr_scheduler_power": ("power", (1, 1.0)),
            "lr_scheduler_min_lr_ratio": ("min_lr_ratio", (0, 0.0)), "lr_decay_steps": ("decay_steps", (0, 0.0)),
            "lr_scheduler_timescale": ("timescale", (None,)), "lr_scheduler_args": ("scheduler_args", ({},))}


def schedule_notices(cfg: Any, given: set[str]) -> list[str]:
    """Start-up notices about the schedule's options: one per option set that the chosen scheduler does not use
    (kohya accepts and ignores them too), and what lr_scheduler_num_cycles means for this config."""
    out: list[str] = []
    name = cfg.lr_scheduler_type or cfg.lr_scheduler
    sd_anima = bool(getattr(cfg, "sd_scripts_anima", False))
    used = ("scheduler_args",) if cfg.lr_scheduler_type else tuple(
        k for k, names in USES.items() if cfg.lr_scheduler in names)
    for option, (key, inert) in _OPTIONS.items():
        value = getattr(cfg, option)
        if option not in given or value in inert:
            continue
        if key == "num_cycles" and name == "cosine" and not sd_anima:
            out.append(f"lr_scheduler_num_cycles = {value:g}: kohya's cosine is always one descent to the minimum "
                       "(it does not pass num_cycles); use cosine_with_restarts or cosine_with_min_lr for more")
        elif key not in used:
            out.append(f"{option} = {value}: not used by lr_scheduler '{name}' (kohya ignores it too); no effect")
        elif key == "num_cycles" and sd_anima and name != "cosine_with_restarts":
            out.append(f"lr_scheduler_num_cycles = {value:g}: an sd-scripts-anima config, so it counts cosine "
                       "periods as sd-scripts-anima documents (0.5 = one descent to the minimum)")
    if cfg.lr_scheduler == "piecewise_constant" and not cfg.lr_scheduler_type and cfg.lr_warmup_steps:
        out.append(f"lr_warmup_steps = {cfg.lr_warmup_steps}: piecewise_constant has no warm-up (kohya ignores it "
                   "too); the step_rules give the lr from the first step")
    return out


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
