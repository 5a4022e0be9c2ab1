"""Flow-matching sampling as ComfyUI does it for Anima: shift-3 sigma table, `simple` scheduler, Euler, CFG.

The model predicts v = noise − x0, so ComfyUI's denoised = x − σ·v and its Euler step
x ← x + (σ_next − σ)·(x − denoised)/σ reduces to x ← x + (σ_next − σ)·v.  CFG mixes denoised
predictions, which for this linear parameterisation is the same as mixing velocities.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from anima_trainer.console import progress_disabled

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = s·σ / (1 + (s − 1)·σ), the discrete-flow shift (s = 3 is ComfyUI's inference schedule); training's
    `shift` timestep sampling uses the same function (train/flow.py)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_table(shift: float = 3.0, timesteps: int = 1000) -> torch.Tensor:
    """ComfyUI's ModelSamplingDiscreteFlow table: σ(t) = shift·t / (1 + (shift−1)·t), t = i/1000, i = 1..1000."""
    return shift_sigma(torch.arange(1, timesteps + 1, dtype=torch.float32) / timesteps, shift)


def simple_schedule(steps: int, shift: float = 3.0) -> torch.Tensor:
    """ComfyUI's `simple` scheduler: `steps` evenly strided entries from the top of the table, then 0."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    table = sigma_table(shift)
    stride = len(table) / steps
    picked = [table[-(1 + int(i * stride))] for i in range(steps)]
    return torch.stack(picked + [torch.zeros(())])


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded N(0,1) noise drawn on the CPU (like ComfyUI), so a seed gives the same image on every device."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def cfg_velocity(model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], cond: torch.Tensor,
                 uncond: torch.Tensor | None, cfg: float) -> Velocity:
    """v(x, σ) with classifier-free guidance; cond and uncond run as one batch when both are needed."""

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if uncond is None or cfg == 1.0:
            return model(x, sigma.expand(b), cond)
        rows = max(cond.shape[1], uncond.shape[1])
        pad = lambda c: torch.nn.functional.pad(c, (0, 0, 0, rows - c.shape[1]))  # noqa: E731
        both = model(torch.cat((x, x)), sigma.expand(2 * b), torch.cat((pad(cond), pad(uncond))))
        v_cond, v_uncond = both[:b], both[b:]
        return v_uncond + cfg * (v_cond - v_uncond)

    return velocity


class SamplingCancelled(Exception):
    """`cancel()` returned true between two sampler steps (a training preview and a stop signal)."""


@torch.no_grad()
def sample_euler(velocity: Velocity, noise: torch.Tensor, sigmas: torch.Tensor, progress: bool = True,
                 cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """Integrate the flow from σ = sigmas[0] to sigmas[-1] (= 0) with Euler steps; returns x0 (normalised).

    `cancel` is asked before every step; when it returns true, SamplingCancelled is raised (so a SIGTERM during
    a long training preview is honoured within one step)."""
    x = noise * sigmas[0]  # σ_max = 1 for the shift-3 table, so this is pure noise (ComfyUI noise_scaling)
    for i in tqdm(range(len(sigmas) - 1), desc="sampling", disable=progress_disabled(not progress)):
        if cancel is not None and cancel():
            raise SamplingCancelled(f"sampling cancelled before step {i + 1} of {len(sigmas) - 1}")
        sigma, nxt = sigmas[i].to(x.device), sigmas[i + 1].to(x.device)
        v = velocity(x, sigma.reshape(1)).float()
        x = x + (nxt - sigma) * v
    return x
