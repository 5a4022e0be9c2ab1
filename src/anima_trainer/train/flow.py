"""Rectified-flow training maths: timestep sampling, noising, velocity target, loss and weighting.

Conventions (docs/anima_arch.md §7, kohya_anima.md §4.2–4.3): x_σ = (1−σ)·x0 + σ·ε, target v = ε − x0,
the DiT receives σ ∈ [0, 1] in **fp32** (kohya rounds it to bf16 first; we do not).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TIMESTEP_SAMPLINGS = ("sigmoid", "uniform", "sigma", "shift", "flux_shift")
WEIGHTING_SCHEMES = ("uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = s·σ / (1 + (s − 1)·σ), the discrete-flow shift (s = 3 is ComfyUI's inference schedule)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flux_shift_mu(patches: int) -> float:
    """μ linear in the number of 2×2 latent patches: 0.5 at 256, 1.15 at 4096."""
    return 0.5 + (1.15 - 0.5) * (patches - 256) / (4096 - 256)


def weighting_density(n: int, scheme: str, generator: torch.Generator | None, logit_mean: float = 0.0,
                      logit_std: float = 1.0, mode_scale: float = 1.29, device: str | torch.device = "cpu"
                      ) -> torch.Tensor:
    """u ∈ (0, 1) drawn from the `weighting_scheme` density (used by `timestep_sampling=sigma`)."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator, device=device) * logit_std + logit_mean)
    u = torch.rand(n, generator=generator, device=device)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sample_sigmas(n: int, *, method: str = "sigmoid", sigmoid_scale: float = 1.0, shift: float = 1.0,
                  weighting_scheme: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                  mode_scale: float = 1.29, patches: int = 4096, generator: torch.Generator | None = None,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """σ per sample in fp32 following kohya's `--timestep_sampling` methods."""
    if method not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {method!r}")
    if method == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if method == "sigma":
        u = weighting_density(n, weighting_scheme, generator, logit_mean, logit_std, mode_scale, device)
        index = (u * 1000).long().clamp(0, 999)  # kohya: the scheduler's (descending, shifted) table at u·1000
        return shift_sigma(torch.linspace(1.0, 1e-3, 1000, device=device), shift)[index]
    sigma = torch.sigmoid(sigmoid_scale * torch.randn(n, generator=generator, device=device))
    if method == "shift":
        return shift_sigma(sigma, shift)
    if method == "flux_shift":
        mu = math.exp(flux_shift_mu(patches))
        return mu / (mu + (1 / sigma - 1))
    return sigma


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
