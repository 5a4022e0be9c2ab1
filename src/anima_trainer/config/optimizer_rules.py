"""Rules between the optimizer and the LR schedule settings of a TrainConfig (train/optim.py,
train/schedulers.py), run by TrainConfig's validation so that a mistake fails before any model loads; they may
also fill in what kohya fills in (the legacy optimizer flags, AdaFactor's `adafactor` schedule)."""

from __future__ import annotations

import logging
from typing import Any

_log = logging.getLogger("anima_trainer.config.train")


def check_optimizer_schedule(self: Any) -> None:
    """Rules between optimizer and schedule settings (train/optim.py, train/schedulers.py), checked at start-up
    so that a mistake fails before the models load.  Messages name every option involved."""
    from anima_trainer.train import optim
    from anima_trainer.train import schedulers as sch

    given = self.model_fields_set
    if self.use_8bit_adam or self.use_lion_optimizer:  # kohya's legacy flags select the optimizer
        flag, wanted = ("use_8bit_adam", "AdamW8bit") if self.use_8bit_adam else ("use_lion_optimizer", "Lion")
        if self.use_8bit_adam and self.use_lion_optimizer:
            raise ValueError("use_8bit_adam and use_lion_optimizer: only one of them may be set")
        if "optimizer_type" in given and self.optimizer_type not in ("AdamW", wanted):
            raise ValueError(f"{flag}: kohya's legacy flag for optimizer_type = \"{wanted}\" conflicts with "
                             f"optimizer_type = \"{self.optimizer_type}\"; remove one of them")
        try:
            optim.resolve_optimizer(wanted)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
        self.optimizer_type = wanted
    try:
        optim.check_optimizer_args(self.optimizer_type, self.optimizer_args, self.unet_lr or self.learning_rate)
    except ValueError as e:
        raise ValueError(f"optimizer_args: {e}") from None
    spec, cls = optim.resolve_optimizer(self.optimizer_type)
    name = spec.name
    if optim.is_schedule_free_class(cls):
        if self.lr_scheduler != "constant" or self.lr_warmup_steps or self.lr_scheduler_type:
            hint = ("; for a warm-up use its own optimizer_args warmup_steps=N"
                    if "warmup_steps" in optim.accepted_args(cls) else "")
            raise ValueError(
                f"optimizer_type: '{name}' is schedule-free and needs lr_scheduler = \"constant\" and "
                f"lr_warmup_steps = 0 (got lr_scheduler = '{self.lr_scheduler_type or self.lr_scheduler}', "
                f"lr_warmup_steps = {self.lr_warmup_steps}){hint}")
    if optim.uses_relative_step(self.optimizer_type, self.optimizer_args):
        if "lr_scheduler" not in given:
            self.lr_scheduler = "adafactor"  # kohya switches to its `adafactor` schedule the same way
        if self.lr_scheduler != "adafactor" or self.lr_warmup_steps or self.lr_scheduler_type:
            raise ValueError(
                f"optimizer_type: AdaFactor with relative_step=True (its default) computes its own step size, "
                f"so it needs lr_scheduler = \"adafactor\" and lr_warmup_steps = 0 (got lr_scheduler = "
                f"'{self.lr_scheduler_type or self.lr_scheduler}', lr_warmup_steps = {self.lr_warmup_steps}); "
                "for a warm-up use optimizer_args warmup_init=True, or set optimizer_args relative_step=False "
                "(usually with scale_parameter=False) to use learning_rate with any lr_scheduler")
        if {"learning_rate", "unet_lr"} & given:
            _log.warning("learning_rate/unet_lr: not used by AdaFactor with relative_step=True (it computes "
                         "its own step size)")
    elif self.lr_scheduler == "adafactor":
        raise ValueError("lr_scheduler: 'adafactor' reports AdaFactor's own step size; it needs optimizer_type = "
                         "\"AdaFactor\" with relative_step=True (its default)")
    if self.lr_scheduler_type:
        if "lr_scheduler" in given and self.lr_scheduler != "constant":
            raise ValueError(f"lr_scheduler_type: replaces lr_scheduler (got lr_scheduler = "
                             f"'{self.lr_scheduler}'); leave lr_scheduler unset")
        if self.lr_warmup_steps:
            raise ValueError("lr_scheduler_type: a custom scheduler class has no warm-up; set lr_warmup_steps "
                             "= 0 (as kohya)")
        cls_s = sch.resolve_scheduler_class(self.lr_scheduler_type)
        self.lr_scheduler_type = f"{cls_s.__module__}.{cls_s.__name__}"
        sch.check_scheduler_args(cls_s, self.lr_scheduler_args)
    # the other options the chosen scheduler does not use are accepted with a notice, as kohya ignores them
    # (config/schedule_rules.py); lr_scheduler_args kohya passes to every schedule function, which fails
    elif self.lr_scheduler_args and self.lr_scheduler != "piecewise_constant":
        raise ValueError(f"lr_scheduler_args: not used by lr_scheduler '{self.lr_scheduler}' (only by "
                         "piecewise_constant and lr_scheduler_type); remove it")
    if self.lr_scheduler == "warmup_stable_decay" and not self.lr_decay_steps:
        raise ValueError("lr_decay_steps: warmup_stable_decay needs a decay (steps, or a fraction < 1)")
    if self.lr_scheduler == "piecewise_constant" and not self.lr_scheduler_type:
        if set(self.lr_scheduler_args) != {"step_rules"}:
            raise ValueError("lr_scheduler_args: piecewise_constant needs exactly step_rules=\"1:100,0.1:200,"
                             f"0.01\" (got {sorted(self.lr_scheduler_args) or 'nothing'})")
        try:
            sch.parse_step_rules(self.lr_scheduler_args["step_rules"])
        except ValueError as e:
            raise ValueError(f"lr_scheduler_args: {e}") from None
    if self.max_train_epochs is None:  # the step count is known: build the schedule once (as the loop will)
        import torch

        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sch.build_scheduler(dummy, self.lr_scheduler, self.max_train_steps, **sch.schedule_options(self))
