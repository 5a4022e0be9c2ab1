"""Fused backward pass (kohya's `fused_backward_pass`): each parameter is updated the moment its gradient is
complete during backward, and its gradient is freed right after, so a full set of gradients never exists.

`PerParameterOptimizer` is a torch Optimizer whose `param_groups` are the run's groups (so the LR scheduler,
`effective_lrs` and the logs work on it unchanged) while the arithmetic is done by one inner optimizer per
parameter, built by the run's own factory (train/optim.py `build_optimizer`).  Why one instance per parameter
rather than one per group with a per-parameter step: torch's optimizers have no public per-parameter step (kohya
patches one into Adafactor only, `step_param`); a single-parameter instance runs the optimizer's own, unmodified
`step()` — any optimizer whose state is per parameter works, its state is exactly a normal optimizer's, and
`state_dict()` reassembles the normal layout (`{"state": {index: ...}, "param_groups": [...]}`) so checkpoints
look and resume the same with the lever on or off.  Before each inner step the group's current hyperparameters
(the scheduler's lr, weight decay, ...) are copied into the inner group.

Without `attach()` it is an ordinary (unfused) optimizer: `step()` updates every parameter that has a gradient.
With `attach()` the updates happen in `Tensor.register_post_accumulate_grad_hook`s; `step()` and `zero_grad()`
become no-ops, so the loop's calls stay the same.  bf16 parameters can be stepped with compensated updates
(train/bf16_update.py) in both modes.

Semantics against the normal path (`check_fused_backward`, the start-up rules):
- gradient clipping by the global norm is impossible (the norm is known only after the last gradient, and the
  first parameters are updated long before); kohya's anima_train.py clips each tensor separately to
  max_grad_norm in the fused pass (`accelerator.clip_grad_norm_(tensor, max_grad_norm)` in its hook), and so do
  we (`clip_per_tensor`), with a start-up notice; max_grad_norm = 0 gives results equal to the unfused path;
- gradient accumulation > 1 is refused (kohya asserts the same): stepping on the last micro-batch only would keep
  the whole gradient set alive until then, which is what the lever removes;
- optimizers that adapt one step size from all parameters (D-Adaptation, Prodigy) or keep their state in the
  param group (schedule-free) are refused: split per parameter they would compute something else;
- the fp16 gradient scaler is refused (it must see every gradient for inf/NaN before any update): use bf16;
- several processes are refused: the data-parallel gradient average (train/grad_sync.py) would come after the
  update (FSDP, issue 19 item 3, is the multi-GPU path for fine-tunes).

In the training loop (train/loop.py, fine-tunes: train/optimizer_levers.py builds and attaches it): the loop's
global `clip_grad_norm_` is skipped (the gradients are gone; the logged grad_norm is None), and because the
update happens inside backward, nonfinite_loss_policy (skip_step / raise) checks the step's loss *before*
backward: a NaN/Inf loss skips the backward entirely, so the weights and the optimizer state never see it (the
same result as the unfused skip).  A non-finite gradient under a finite loss cannot be caught before its tensor is
updated; the weights' finiteness is still checked before every save (no state is written from NaN weights).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from anima_trainer.config.errors import ConfigError
from anima_trainer.train.bf16_update import compensated_step, widened
from anima_trainer.train.optim import SPECS, build_optimizer, is_schedule_free_class, resolve_optimizer

__all__ = ["PerParameterOptimizer", "build_per_parameter_optimizer", "check_fused_backward", "per_parameter_refusal"]

# group keys that choose the implementation, not the arithmetic: each inner optimizer keeps its own (an offloaded
# AdamW on host tensors runs foreach even when a loaded state says fused)
_NOT_HYPERPARAMETERS = frozenset({"params", "foreach", "fused", "capturable", "differentiable"})
OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


class _MemberStates(Mapping):
    """{parameter: its state} across the inner optimizers, read-only: `optimizer.state` of the split optimizer
    for code that reads it (the `adafactor` schedule, effective_lrs)."""

    def __init__(self, members: dict[torch.Tensor, torch.optim.Optimizer],
                 stepped: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._members, self._stepped = members, stepped

    def __getitem__(self, p: torch.Tensor) -> dict[str, Any]:
        return self._members[p].state[self._stepped(p)]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for p, m in self._members.items() if m.state.get(self._stepped(p)))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class PerParameterOptimizer(torch.optim.Optimizer):
    """The run's optimizer split into one inner optimizer per trained parameter (see the module docstring).

    `groups`: param groups (dicts with "params" and optional "lr"/"name"/...) or a list of tensors;
    `factory(groups)` builds an inner optimizer over one single-parameter group (e.g. `lambda g:
    build_optimizer(g, lr, args, device, optimizer_type=...)`); `bf16_update` = "compensated" steps bf16 parameters
    with exactly compensated updates (train/bf16_update.py), None plainly."""

    def __init__(self, groups: Iterable[dict[str, Any]] | Iterable[torch.Tensor], factory: OptimizerFactory, *,
                 bf16_update: str | None = None) -> None:
        groups = [g if isinstance(g, dict) else {"params": [g]} for g in groups]
        if bf16_update not in (None, "compensated"):
            raise ValueError(f"bf16_update = {bf16_update!r}: accepted are None and 'compensated'")
        self.bf16_update = bf16_update
        self.members: dict[torch.Tensor, torch.optim.Optimizer] = {}
        full_groups = []
        for group in groups:
            params = list(group["params"])
            options = {k: v for k, v in group.items() if k != "params"}
            inner_options: dict[str, Any] = {}
            for p in params:
                member = factory([{**options, "params": [self._stepped(p)]}])
                self.members[p] = member
                inner_options = {k: v for k, v in member.param_groups[0].items() if k != "params"}
            full_groups.append({**options, **inner_options, "params": params})  # as the optimizer built it
        super().__init__(full_groups, defaults={})
        self.state = _MemberStates(self.members, self._stepped)  # type: ignore[assignment]  # what .state reads
        first = next(iter(self.members.values()), None)
        if first is not None and hasattr(first, "_get_lr"):  # Adafactor's own step size (effective_lrs, schedule)
            self._get_lr = first._get_lr
        self.clip_per_tensor = 0.0
        self._handles: list[Any] = []
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}

    # --- the update of one parameter ----------------------------------------------------------------------
    def _stepped(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor the inner optimizer of `p` steps: `p` itself here; train/optimizer_offload.py's subclass
        steps a host copy."""
        return p

    def _update(self, p: torch.Tensor, member: torch.optim.Optimizer) -> None:
        """Step `p` (gradient in p.grad) with its inner optimizer: compensated for bf16 weights when asked."""
        if self._compensates(p):
            compensated_step(member, p)
        else:
            member.step()

    def _sync_hyperparameters(self, p: torch.Tensor) -> torch.optim.Optimizer:
        member = self.members[p]
        inner = member.param_groups[0]
        for k, v in self._group_of[p].items():
            if k not in _NOT_HYPERPARAMETERS:
                inner[k] = v
        return member

    def _compensates(self, p: torch.Tensor) -> bool:
        return self.bf16_update == "compensated" and p.dtype == torch.bfloat16

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        """Update `p` from its gradient with its own optimizer at the group's current hyperparameters, then free
        the gradient."""
        if p.grad is None:
            return
        if self.clip_per_tensor > 0:
            torch.nn.utils.clip_grad_norm_([p], self.clip_per_tensor)
        self._update(p, self._sync_hyperparameters(p))
        p.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Unfused: update every parameter that has a gradient.  Fused (attached): nothing left to do."""
        loss = closure() if closure is not None else None
        if not self._handles:
            for group in self.param_groups:
                for p in group["params"]:
                    self.step_param(p)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    # --- fused mode ---------------------------------------------------------------------------------------
    def attach(self, clip_per_tensor: float = 0.0) -> None:
        """Fuse the updates into backward: each parameter steps (and frees its gradient) as soon as its gradient
        is accumulated.  `clip_per_tensor` > 0 clips each gradient to that norm on its own (kohya's fused pass
        with max_grad_norm; not the global norm)."""
        if self._handles:
            raise RuntimeError("the fused backward pass is already attached")
        self.clip_per_tensor = clip_per_tensor
        self._handles = [p.register_post_accumulate_grad_hook(self.step_param) for p in self.members
                         if p.requires_grad]

    def detach(self) -> None:
        """Back to stepping after backward (`step()`; the loop's own clipping applies again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clip_per_tensor = 0.0

    @property
    def fused(self) -> bool:
        return bool(self._handles)

    # --- checkpoints in a normal optimizer's layout -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """A normal optimizer's state dict over the same groups: parameters numbered in group order, each with
        its inner optimizer's state (and the int16 "fp32_remainder" when compensated); groups with their
        hyperparameters."""
        state: dict[int, Any] = {}
        groups = []
        index = 0
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                inner = self.members[p].state_dict()["state"].get(0)
                if inner:
                    state[index] = inner
                ids.append(index)
                index += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a state dict in the normal layout (from this class or from the ordinary optimizer)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups, strict=True)):
            raise ValueError("the optimizer state has other parameter groups than this run's")
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
            for i, p in zip(saved["params"], group["params"], strict=True):
                member = self._sync_hyperparameters(p)
                inner_state = state_dict["state"].get(i, state_dict["state"].get(str(i)))
                inner_group = {**member.param_groups[0], "params": [0]}
                inner = {"state": {0: dict(inner_state)} if inner_state else {}, "param_groups": [inner_group]}
                if self._compensates(p):
                    with widened(self._stepped(p)):  # torch casts loaded state to the parameter's dtype: fp32 here
                        member.load_state_dict(inner)
                else:
                    member.load_state_dict(inner)


def build_per_parameter_optimizer(groups: Iterable[dict[str, Any]] | Iterable[torch.Tensor], lr: float,
                                  optimizer_args: dict[str, Any] | None, device: torch.device, *,
                                  optimizer_type: str = "AdamW", bf16_update: str | None = None,
                                  kind: type[PerParameterOptimizer] | None = None,
                                  **options: Any) -> PerParameterOptimizer:
    """The run's optimizer (train/optim.py `build_optimizer`, same arguments) split per parameter.  It is first
    built whole (no state exists before a step, so this costs nothing): the rules between groups (one step size
    for all, relative step against per-group lrs) and the start-up notices apply once, as in the normal path;
    the per-parameter builds are then quiet.  `kind`: a subclass (train/optimizer_offload.py), built with
    `options`."""
    groups = list(groups)
    build_optimizer(groups, lr, optimizer_args, device, optimizer_type=optimizer_type)
    optim_log = logging.getLogger(build_optimizer.__module__)

    def factory(single: list[dict[str, Any]]) -> torch.optim.Optimizer:
        level = optim_log.level
        optim_log.setLevel(logging.ERROR)
        try:
            return build_optimizer(single, lr, optimizer_args, device, optimizer_type=optimizer_type)
        finally:
            optim_log.setLevel(level)

    return (kind or PerParameterOptimizer)(groups, factory, bf16_update=bf16_update, **options)


def per_parameter_refusal(optimizer_type: str) -> str | None:
    """Why `optimizer_type` cannot be split into one optimizer per parameter (None: it can): the reason and the
    fix, for the levers built on PerParameterOptimizer (fused backward, compensated bf16, optimizer_offload)."""
    spec, cls = resolve_optimizer(optimizer_type)
    if spec.one_lr or SPECS.get(spec.name.lower(), spec).one_lr:
        return (f"{spec.name} adapts one step size from all parameters at once, which a per-parameter update cannot "
                "compute; use AdamW, AdamW8bit or AdaFactor")
    if is_schedule_free_class(cls):
        return (f"{spec.name} keeps its schedule in the parameter group, shared by all parameters; use AdamW, "
                "AdamW8bit or AdaFactor")
    return None


def check_fused_backward(*, optimizer_type: str, max_grad_norm: float, gradient_accumulation_steps: int,
                         mixed_precision: str, world_size: int = 1) -> list[str]:
    """The start-up rules of fused_backward_pass (module docstring): ConfigError naming the option and the fix
    where the fused pass cannot give the run's meaning; returns the notices to print."""
    if gradient_accumulation_steps > 1:
        raise ConfigError(f"fused_backward_pass: each parameter is updated during backward, so gradients cannot "
                          f"accumulate over gradient_accumulation_steps = {gradient_accumulation_steps} (kohya "
                          "refuses it too); set gradient_accumulation_steps = 1 (a larger train_batch_size) or "
                          "remove fused_backward_pass")
    refusal = per_parameter_refusal(optimizer_type)
    if refusal:
        raise ConfigError(f"fused_backward_pass: {refusal}")
    if mixed_precision == "fp16":
        raise ConfigError("fused_backward_pass: with mixed_precision = \"fp16\" the gradient scaler must check every "
                          "gradient for overflow before any update; use mixed_precision = \"bf16\"")
    if world_size > 1:
        raise ConfigError(f"fused_backward_pass: with {world_size} processes each gradient must be averaged across "
                          "them before its update, and the gradient average runs in buckets after the gradients are "
                          "complete (train/grad_sync.py); train on one process or remove fused_backward_pass")
    notices = []
    if max_grad_norm > 0:
        notices.append(f"fused_backward_pass with max_grad_norm = {max_grad_norm:g}: the global gradient "
                       "norm is not known until the last parameter has been updated, so each gradient is clipped to "
                       "that norm on its own (as kohya's anima_train.py does); max_grad_norm = 0 turns it off")
    return notices
