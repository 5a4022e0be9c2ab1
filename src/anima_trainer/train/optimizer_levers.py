"""The optimizer-side memory levers of a fine-tune (issue 19 item 2), chosen from the config in one place: which
are on (`finetune_levers`), their start-up rules and notices (`check_finetune_levers`), the optimizer they build
(`build_finetune_optimizer`) and the words the start-up summary prints (`describe_levers`).

- compensated bf16 updates (train/bf16_update.py): a fine-tune with mixed_precision = "bf16" (with or without
  full_bf16) holds its trained weights in bf16, the precision the forward runs in, and updates them with exactly
  compensated steps: the int16 remainder in the optimizer state makes every update the one an fp32 master copy
  would get, at 4 bytes per parameter instead of 6.  That is kohya's meaning of mixed bf16 (fp32 weights, bf16
  forward), bit for bit on the weights' fp32 values; Kahan with a bf16 buffer drifts and stochastic rounding
  adds noise (the measured reasons are in bf16_update.py).  Needs an optimizer that steps per parameter; with
  D-Adaptation, Prodigy or a schedule-free one the weights are updated plainly in bf16, with a notice;
- fused_backward_pass (train/fused_backward.py): each parameter steps during backward, its gradient freed;
- optimizer_offload (train/optimizer_offload.py): the optimizer state in host memory.

Across processes what decides is whether the run is sharded (train/sharded_run.py `wants_sharding`), not the
process count.  Sharded (FSDP2, fsdp_sharding = "auto"): no compensated steps (FSDP keeps its own master
weights), optimizer_offload refused (FSDP already splits the state).  Data parallel (fsdp_sharding = "off": the
whole DiT in every process, train/grad_sync.py averages the gradients): the average is complete before
`optimizer.step()`, so every process steps the same exact fp32 values with the same gradient and compensated bf16
and optimizer_offload work as on one process (tests/train/test_ddp_finetune.py).  fused_backward_pass stays one
process only: its per-parameter step would run before the gradient average.

Each of them builds the run's optimizer as a PerParameterOptimizer; without any, a fine-tune gets the ordinary
optimizer (fp32 weights, mixed_precision = "no"; and fp16, whose weights are held in fp16 as before).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from anima_trainer.config import TrainConfig
from anima_trainer.train.distributed import launched_world_size
from anima_trainer.train.fused_backward import (
    build_per_parameter_optimizer,
    check_fused_backward,
    per_parameter_refusal,
)
from anima_trainer.train.optim import build_optimizer
from anima_trainer.train.optimizer_offload import OffloadedOptimizer, check_optimizer_offload
from anima_trainer.train.sharded_run import wants_sharding

__all__ = ["FinetuneLevers", "build_finetune_optimizer", "check_finetune_levers", "describe_levers",
           "finetune_levers"]


@dataclass(frozen=True)
class FinetuneLevers:
    """Which optimizer-side levers a run uses (all off for an adapter network)."""

    compensated_bf16: bool = False
    fused_backward: bool = False
    optimizer_offload: bool = False

    @property
    def per_parameter(self) -> bool:
        """Whether the optimizer is split per parameter (PerParameterOptimizer)."""
        return self.compensated_bf16 or self.fused_backward or self.optimizer_offload


def finetune_levers(cfg: TrainConfig, world_size: int | None = None) -> FinetuneLevers:
    """The levers `cfg` turns on (no checks: check_finetune_levers refuses what cannot be honoured).  A run
    sharded across processes (`world_size`, default: this run's; train/fsdp.py) keeps fp32 master weights of its
    own, so no compensated bf16 steps there; a data-parallel one steps like one process (module docstring)."""
    if not cfg.finetunes:
        return FinetuneLevers()
    sharded = wants_sharding(cfg, launched_world_size() if world_size is None else world_size)
    bf16 = cfg.mixed_precision == "bf16" and not sharded
    return FinetuneLevers(compensated_bf16=bf16 and per_parameter_refusal(cfg.optimizer_type) is None,
                          fused_backward=cfg.fused_backward_pass, optimizer_offload=cfg.optimizer_offload)


def check_finetune_levers(cfg: TrainConfig, world_size: int = 1) -> list[str]:
    """The start-up rules of the levers (ConfigError naming the option and the fix) and their notices."""
    if not cfg.finetunes:
        return []
    notices: list[str] = []
    if cfg.fused_backward_pass:
        notices += check_fused_backward(optimizer_type=cfg.optimizer_type, max_grad_norm=cfg.max_grad_norm,
                                        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                        mixed_precision=cfg.mixed_precision, world_size=world_size)
    sharded = wants_sharding(cfg, world_size)
    if cfg.optimizer_offload:
        check_optimizer_offload(cfg.optimizer_type, processes=world_size if sharded else 1)
    if cfg.mixed_precision == "bf16" and not sharded and (refusal := per_parameter_refusal(cfg.optimizer_type)):
        notices.append(f"mixed_precision = \"bf16\": the fine-tuned weights are updated plainly in bf16, not with "
                       f"compensated steps, because {refusal.split(';')[0]} (updates below half a bf16 step round "
                       "away; kohya keeps fp32 weights); for fp32-exact updates use AdamW or AdaFactor, or "
                       "mixed_precision = \"no\"")
    return notices


def build_finetune_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]], lr: float,
                             device: torch.device) -> torch.optim.Optimizer:
    """The fine-tune's optimizer with its levers (the ordinary one when none is on); fused: attached, each
    gradient clipped on its own to max_grad_norm (kohya's fused pass)."""
    levers = finetune_levers(cfg)
    if not levers.per_parameter:
        return build_optimizer(groups, lr, cfg.optimizer_args, device, optimizer_type=cfg.optimizer_type)
    offload = {"kind": OffloadedOptimizer, "host": "cpu"} if levers.optimizer_offload else {}
    optimizer = build_per_parameter_optimizer(
        groups, lr, cfg.optimizer_args, torch.device("cpu") if levers.optimizer_offload else device,
        optimizer_type=cfg.optimizer_type, bf16_update="compensated" if levers.compensated_bf16 else None, **offload)
    if levers.fused_backward:
        optimizer.attach(clip_per_tensor=cfg.max_grad_norm)
    return optimizer


def describe_levers(cfg: TrainConfig) -> str:
    """The levers for the start-up summary, e.g. "bf16 weights with compensated updates, fused backward,
    optimizer state on host" ("" when none)."""
    levers = finetune_levers(cfg)
    words = []
    if levers.compensated_bf16:
        words.append("bf16 weights with compensated updates")
    elif cfg.mixed_precision == "bf16" and wants_sharding(cfg, launched_world_size()):
        words.append("fp32 master shards, bf16 compute (FSDP2)")
    elif cfg.finetunes and cfg.mixed_precision in ("bf16", "fp16"):
        words.append(f"{cfg.mixed_precision} weights with plain updates")
    if levers.fused_backward:
        words.append("fused backward")
    if levers.optimizer_offload:
        words.append("optimizer state on host")
    return ", ".join(words)
