"""Optimizer and learning-rate schedule built from the TrainConfig (AdamW first; more in the operations issue)."""

from __future__ import annotations

import math

import torch


def resolve_warmup(warmup: int | float | None, max_steps: int) -> int:
    """kohya semantics: an int is steps, a float < 1 is a fraction of the total steps."""
    if not warmup:
        return 0
    if isinstance(warmup, float) and warmup < 1:
        return int(warmup * max_steps)
    return int(warmup)


def build_optimizer(params: list[dict] | list[torch.nn.Parameter], lr: float, optimizer_args: dict | None = None,
                    device: torch.device | None = None) -> torch.optim.Optimizer:
    """AdamW on fp32 parameters; fused on CUDA (one kernel for all tensors)."""
    args = {k: _literal(v) for k, v in (optimizer_args or {}).items()}
    if device is not None and device.type == "cuda" and "fused" not in args and "foreach" not in args:
        args["fused"] = True
    return torch.optim.AdamW(params, lr=lr, **args)


def _literal(value):
    """'0.01' → 0.01, '(0.9,0.99)' → (0.9, 0.99), 'True' → True; kohya passes optimizer_args as strings."""
    if not isinstance(value, str):
        return value
    import ast

    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, max_steps: int,
                    warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """constant | constant_with_warmup | linear | cosine, each with an optional linear warmup."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        if name == "linear":
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        raise ValueError(f"lr_scheduler {name!r} is not implemented (constant, constant_with_warmup, linear, cosine)")

    factor(warmup_steps)  # validate the name now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
