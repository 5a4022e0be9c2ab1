"""What the DiT's input and output mean under rectified flow, and the loss between its prediction and target.

x_σ = (1−σ)·x0 + σ·ε, target v = ε − x0 (docs/anima_arch.md §7, kohya_anima.md §4.2–4.3).  The training
objective (train/flow.py) and the held-out measurements (evaluation/heldout.py, which the run's validation
uses) share these definitions, so a loss logged by validation and one computed by evaluation/heldout.py are the
same number for the same inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε (σ broadcast over C, T, H, W)."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def loss_weighting(sigma: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample loss weight: 1 except `sigma_sqrt` (σ⁻²) and `cosmap` (SD3's cosine map)."""
    if scheme == "sigma_sqrt":
        return (sigma ** -2.0).float()
    if scheme == "cosmap":
        bot = 1 - 2 * sigma + 2 * sigma ** 2
        return (2 / (math.pi * bot)).float()
    return torch.ones_like(sigma, dtype=torch.float32)


def flow_loss(pred: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, *, loss_type: str = "l2",
              huber_c: float = 0.1, weighting_scheme: str = "uniform", mask: torch.Tensor | None = None,
              sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over batch of the per-sample mean element loss × weighting, in fp32.

    `mask` (broadcastable to the latents, e.g. [B,1,1,h,w] in [0,1]) multiplies the element loss before the
    mean, as kohya's masked loss; `sample_weights` [B] scales samples (e.g. `prior_loss_weight` for reg
    images)."""
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        elem = F.mse_loss(pred, target, reduction="none")
    elif loss_type == "l1":
        elem = F.l1_loss(pred, target, reduction="none")
    elif loss_type == "huber":  # kohya's pseudo-Huber with constant c
        elem = 2 * huber_c * (torch.sqrt((pred - target) ** 2 + huber_c ** 2) - huber_c)
    elif loss_type == "smooth_l1":
        elem = 2 * (torch.sqrt((pred - target) ** 2 + huber_c ** 2) - huber_c)
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if mask is not None:
        elem = elem * mask.to(elem.device, torch.float32)
    per_sample = elem.mean(dim=tuple(range(1, elem.dim())))
    per_sample = per_sample * loss_weighting(sigma, weighting_scheme).to(per_sample.device)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample.device, torch.float32)
    return per_sample.mean()
