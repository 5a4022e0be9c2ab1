"""Optimizer state in host memory (`optimizer_offload`, fine-tunes): the GPU holds the weights and, briefly, their
gradients; every trained parameter's optimizer state (AdamW's two fp32 moments: 8 bytes per parameter) and, for
bf16 weights, the int16 remainder of the compensated update (train/bf16_update.py) live in host memory.

How: `OffloadedOptimizer` is a `PerParameterOptimizer` (train/fused_backward.py) whose inner optimizer of each
parameter steps a host copy of it instead of the parameter itself.  One update of a parameter `p`:
copy the weight and its gradient to the host buffers (pinned when CUDA is available, so the copies are DMA), step
there with the optimizer's own, unmodified `step()` (compensated for bf16 weights), copy the new weight back into
`p`.  Fused (`attach()`, kohya's fused_backward_pass) this runs from each parameter's gradient hook, so a gradient
is freed as soon as it reached the host; unfused it runs in `step()` after backward.  The device weight stays the
one truth: the host weight buffer is refreshed from it before every step, so nothing written into the weights
from outside (a resume, a loaded checkpoint) can go stale — at the price of one more device→host copy of the
weights per step (bf16: 2 bytes per parameter).  Copies are blocking: the host step needs the gradient, and the
next forward needs the weight.

The arithmetic is the on-device optimizer's, on CPU tensors: the result is bit-identical to the on-device step
where the two devices compute the same (always on a CPU-only run; on CUDA the host's AdamW may round differently
from the GPU's fused/foreach kernels in the last bit).  The state dict has the normal layout (PerParameterOptimizer
`state_dict`), its tensors on the host; a checkpoint resumes in either direction (on device ↔ offloaded).

The host step is CPU compute: AdamW over 2.1 B parameters is several seconds per step on a few cores — the lever
trades step time for the 8 (AdamW) bytes per parameter of device memory that train/finetune_memory.py models.

Alternative not used: torchao's `CPUOffloadOptimizer` (torchao.optim) does the same job and overlaps the
gradient copies with backward on a side stream.  It is not installed here and not a dependency of anima-trainer;
and it would not fit the run's machinery: it builds one `optimizer_class` per parameter from its own gradient
hooks, exposes one param group per parameter (not the run's named groups the LR schedule, the logs and the resume
checks read), and saves `{"offloaded": [one state dict per parameter], "on-device": ...}` instead of the normal
layout, so a state could not resume across the lever; nor does it step bf16 weights with the exact remainder.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from anima_trainer.config.errors import ConfigError
from anima_trainer.train.fused_backward import OptimizerFactory, PerParameterOptimizer, per_parameter_refusal
from anima_trainer.train.optim import canonical_optimizer_name, without_cuda

__all__ = ["OffloadedOptimizer", "check_optimizer_offload", "host_buffer"]


def host_buffer(like: torch.Tensor, host: torch.device) -> torch.Tensor:
    """An empty tensor shaped as `like` on `host`, pinned when `host` is the CPU and CUDA is available (pinned
    memory makes device↔host copies direct DMA)."""
    pin = host.type == "cpu" and torch.cuda.is_available()
    return torch.empty(like.shape, dtype=like.dtype, device=host, pin_memory=pin)


class OffloadedOptimizer(PerParameterOptimizer):
    """PerParameterOptimizer with each parameter's optimizer state on `host` (module docstring).

    Same arguments as PerParameterOptimizer, plus `host` (default: the CPU)."""

    def __init__(self, groups: Iterable[dict[str, Any]] | Iterable[torch.Tensor], factory: OptimizerFactory, *,
                 bf16_update: str | None = None, host: torch.device | str = "cpu") -> None:
        self.host = torch.device(host)
        groups = [g if isinstance(g, dict) else {"params": [g]} for g in groups]
        self.host_params: dict[torch.Tensor, torch.Tensor] = {}  # parameter → the host tensor its optimizer steps
        for group in groups:
            for p in group["params"]:
                self.host_params[p] = host_buffer(p, self.host).copy_(p.detach())
        super().__init__(groups, factory, bf16_update=bf16_update)

    def _stepped(self, p: torch.Tensor) -> torch.Tensor:
        return self.host_params[p]

    def _update(self, p: torch.Tensor, member: torch.optim.Optimizer) -> None:
        """The weight and its gradient to the host, the step there, the new weight back into `p`."""
        h = self.host_params[p]
        h.copy_(p.detach())  # the device weight is the truth (a resume or a loaded file wrote it)
        if h.grad is None:  # kept for the next steps: pinned memory is slow to allocate
            h.grad = host_buffer(p.grad, self.host)
        h.grad.copy_(p.grad)
        super()._update(h, member)
        p.detach().copy_(h)


def check_optimizer_offload(optimizer_type: str, *, processes: int = 1) -> None:
    """optimizer_offload's start-up rules: not in a run sharded over `processes` > 1 (FSDP shards the state
    instead; a data-parallel run passes 1: each process steps its whole copy after the gradient average, as one
    process does), and an optimizer that steps per parameter, on CPU tensors."""
    if processes > 1:
        raise ConfigError(f"optimizer_offload: with {processes} processes the fine-tune is sharded (FSDP), which "
                          "already splits the optimizer state across the GPUs; remove optimizer_offload, set "
                          "fsdp_sharding = \"off\" (data parallel: the whole DiT and its offloaded state in every "
                          "process) or train on one process")
    refusal = per_parameter_refusal(optimizer_type)
    if refusal:
        raise ConfigError(f"optimizer_offload: {refusal}")
    name = canonical_optimizer_name(optimizer_type)
    if without_cuda(optimizer_type) is not None or name.startswith("bitsandbytes."):
        raise ConfigError(f"optimizer_offload: {name} (bitsandbytes) steps CUDA tensors only, and the offloaded "
                          "state is stepped in host memory; use AdamW or AdaFactor (8-bit state is unnecessary "
                          "when it lives in host memory), or remove optimizer_offload")
