"""The rules between the optimizer and the LR-schedule settings that the settings alone decide (no torch, no
class is imported), run by TrainConfig's validation; they also fill in what kohya fills in by name (the legacy
optimizer flags' optimizer_type, AdaFactor's `adafactor` schedule).

Why split: the rules that need the optimizer or scheduler class (is the name installed, do optimizer_args fit its
signature, is it schedule-free, does the schedule build) run in the train layer at the run's start-up, before
any model loads (train/optim.py `check_optimization`), so that validating a config imports no optimizer package.
"""

from __future__ import annotations

from typing import Any

from anima_trainer.config import kohya_options as ko
from anima_trainer.config.schedule_rules import parse_step_rules

# kohya's names (case-insensitive), sd-scripts-anima's underscore aliases (seed_system.md §1.4) and torch's own
# paths of AdamW; train/optim.py resolves the rest (torch.optim / pytorch_optimizer class names, module.Class)
OPTIMIZER_NAMES = {name.lower(): name for name in ko.KOHYA_OPTIMIZERS}
OPTIMIZER_ALIASES = {**ko.OPTIMIZER_ALIASES, "torch.optim.adamw": "AdamW", "torch.optim.adamw.adamw": "AdamW"}
LEGACY_OPTIMIZER_FLAGS = {"use_8bit_adam": "AdamW8bit", "use_lion_optimizer": "Lion"}


def optimizer_name(value: str) -> str:
    """The stored form of an optimizer_type as far as names decide it: kohya's spelling of its names and aliases
    ("" is kohya's default AdamW); anything else as given, for train/optim.py to resolve by class."""
    name = value.strip() or "AdamW"
    name = OPTIMIZER_ALIASES.get(name.lower(), name)
    return OPTIMIZER_NAMES.get(name.lower(), name)


def is_transformers_adafactor(optimizer_type: str) -> bool:
    """Whether the name is transformers' Adafactor (kohya's AdaFactor, or a path to the class in transformers)."""
    root, cls_name = optimizer_type.partition(".")[0], optimizer_type.rpartition(".")[2]
    return optimizer_type == "AdaFactor" or (root == "transformers" and cls_name.lower() == "adafactor")


def legacy_optimizer_flag(cfg: Any) -> str | None:
    """The kohya legacy flag (use_8bit_adam, use_lion_optimizer) that chose the optimizer, if any."""
    return next((flag for flag in LEGACY_OPTIMIZER_FLAGS if getattr(cfg, flag)), None)


def check_optimizer_schedule(cfg: Any) -> None:
    """Rules between optimizer and schedule settings that need no class (train/optim.py `check_optimization` runs
    the others at start-up).  Messages name every option involved."""
    given = cfg.model_fields_set
    if flag := legacy_optimizer_flag(cfg):  # kohya's legacy flags select the optimizer
        wanted = LEGACY_OPTIMIZER_FLAGS[flag]
        if cfg.use_8bit_adam and cfg.use_lion_optimizer:
            raise ValueError("use_8bit_adam and use_lion_optimizer: only one of them may be set")
        if "optimizer_type" in given and cfg.optimizer_type not in ("AdamW", wanted):
            raise ValueError(f"{flag}: kohya's legacy flag for optimizer_type = \"{wanted}\" conflicts with "
                             f"optimizer_type = \"{cfg.optimizer_type}\"; remove one of them")
        cfg.optimizer_type = wanted
    if (is_transformers_adafactor(cfg.optimizer_type) and bool(cfg.optimizer_args.get("relative_step", True))
            and "lr_scheduler" not in given):
        cfg.lr_scheduler = "adafactor"  # kohya switches AdaFactor's relative step to its own schedule the same way
    if cfg.lr_scheduler_type:
        if "lr_scheduler" in given and cfg.lr_scheduler != "constant":
            raise ValueError(f"lr_scheduler_type: replaces lr_scheduler (got lr_scheduler = "
                             f"'{cfg.lr_scheduler}'); leave lr_scheduler unset")
        if cfg.lr_warmup_steps:
            raise ValueError("lr_scheduler_type: a custom scheduler class has no warm-up; set lr_warmup_steps "
                             "= 0 (as kohya)")
    # the other options the chosen scheduler does not use are accepted with a notice, as kohya ignores them
    # (config/schedule_rules.py); lr_scheduler_args kohya passes to every schedule function, which fails
    elif cfg.lr_scheduler_args and cfg.lr_scheduler != "piecewise_constant":
        raise ValueError(f"lr_scheduler_args: not used by lr_scheduler '{cfg.lr_scheduler}' (only by "
                         "piecewise_constant and lr_scheduler_type); remove it")
    if cfg.lr_scheduler == "warmup_stable_decay" and not cfg.lr_decay_steps:
        raise ValueError("lr_decay_steps: warmup_stable_decay needs a decay (steps, or a fraction < 1)")
    if cfg.lr_scheduler == "piecewise_constant" and not cfg.lr_scheduler_type:
        if set(cfg.lr_scheduler_args) != {"step_rules"}:
            raise ValueError("lr_scheduler_args: piecewise_constant needs exactly step_rules=\"1:100,0.1:200,"
                             f"0.01\" (got {sorted(cfg.lr_scheduler_args) or 'nothing'})")
        try:
            parse_step_rules(cfg.lr_scheduler_args["step_rules"])
        except ValueError as e:
            raise ValueError(f"lr_scheduler_args: {e}") from None
