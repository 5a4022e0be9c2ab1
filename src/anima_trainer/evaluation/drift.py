"""How much a network changes the DiT's prediction: preservation drift (prompts without the trigger), trigger
response (prompts with it) and their ratio, the leak score.

For one prompt p, seed s and σ (all fixed, so the numbers repeat exactly):
  * ε = the seed's N(0, 1) latent [16, 1, h, w], drawn on the CPU as the sampler draws it (`initial_noise`), the
    same for every prompt;
  * x̂0 = ε − v_base(ε, σ=1, p): the base model's one-step estimate of the image for p from that noise, so the
    probe points x_σ = (1 − σ)·x̂0 + σ·ε lie where sampling that prompt passes, not off the image manifold;
  * r(p, s, σ) = ‖v_adapted(x_σ, σ, p) − v_base(x_σ, σ, p)‖² / ‖v_base(x_σ, σ, p)‖², squared L2 norms over the
    whole latent, in fp32.  v_base is the same DiT with the network's multiplier at 0 (no second model).
Each σ bucket is the **mean of the ratios** over its (prompt, seed) pairs — every prompt and seed weighs the
same, whatever its own velocity magnitude — and `overall` is the mean of the buckets (= the mean ratio over all
(prompt, seed, σ), the buckets being equally full).  0 means the network leaves those predictions untouched; for
a small update r grows with the square of the strength.

Leak score = preservation drift / trigger response (per bucket and overall, ratio of the two means): the share
of the change a LoRA makes to its trigger prompts that it also makes to prompts without the trigger.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from anima_trainer.evaluation.heldout import VALIDATION_SIGMAS, check_sigmas
from anima_trainer.evaluation.results import SigmaMetric
from anima_trainer.evaluation.strength import at_strength
from anima_trainer.models.flow_maths import noisy_input
from anima_trainer.sample.sampler import initial_noise

LATENT_CHANNELS = 16
# latent height, width of the probe: 64 × 64 latents = 512 × 512 px, kohya's preview size (cheap, yet every
# block sees a real token grid)
PROBE_LATENT_SIZE: tuple[int, int] = (64, 64)


def _stack_contexts(contexts: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """[P, L, D] from a [P, L, D] tensor or P tensors [L, D] / [1, L, D] of one shape."""
    if isinstance(contexts, torch.Tensor):
        if contexts.dim() != 3:
            raise ValueError(f"contexts must be [prompts, rows, width], got shape {tuple(contexts.shape)}")
        return contexts
    rows = [c[0] if c.dim() == 3 and c.shape[0] == 1 else c for c in contexts]
    if not rows:
        raise ValueError("drift needs at least one prompt context")
    if len({tuple(r.shape) for r in rows}) != 1 or rows[0].dim() != 2:
        raise ValueError("prompt contexts must all have one shape [rows, width] (the text conditioner pads to 512 "
                         f"rows), got {sorted({tuple(r.shape) for r in rows})}")
    return torch.stack(rows)


def _device_of(dit: nn.Module, device: torch.device | str | None) -> torch.device:
    """`device`, or where the DiT's first parameter lives (give it with block swap, which parks blocks on the CPU)."""
    return torch.device(device) if device is not None else next(dit.parameters()).device


@torch.no_grad()
def velocity_change(dit: nn.Module, network: nn.Module, contexts: torch.Tensor | Sequence[torch.Tensor], *,
                    seeds: Sequence[int], sigmas: Sequence[float] = VALIDATION_SIGMAS, strength: float = 1.0,
                    latent_size: tuple[int, int] = PROBE_LATENT_SIZE, batch_size: int = 8,
                    device: torch.device | str | None = None, name: str = "velocity_change") -> SigmaMetric:
    """Mean ‖v_adapted − v_base‖² / ‖v_base‖² per σ bucket over every (context, seed) pair (module docstring),
    with `network` (injected into `dit`) at multiplier `strength`.  `contexts`: the encoded prompts, [P, L, D]
    or P tensors of one shape; they are inputs, so a text-encoder part of the network is not measured.  Runs
    `batch_size` pairs per forward on `device` (default: the DiT's); the numbers repeat bit for bit for the same
    inputs, device and batch size.
    The network's multipliers and training mode are restored afterwards."""
    sigmas = check_sigmas(sigmas)
    if not seeds:
        raise ValueError(f"{name} needs at least one seed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = _device_of(dit, device)
    context_rows = _stack_contexts(contexts).to(device)
    pairs = [(p, int(s)) for p in range(context_rows.shape[0]) for s in seeds]
    shape = (LATENT_CHANNELS, 1, *latent_size)
    ratios: dict[float, list[torch.Tensor]] = {s: [] for s in sigmas}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        n = len(chunk)
        noise = torch.stack([initial_noise(shape, seed) for _, seed in chunk]).to(device)
        context = context_rows[[p for p, _ in chunk]]
        base: dict[float, torch.Tensor] = {}
        points: dict[float, torch.Tensor] = {}
        with at_strength(network, 0.0):
            one = torch.ones(n, dtype=torch.float32, device=device)
            x0 = noise - dit(noise, one, context).float()
            for s in sigmas:
                sigma = torch.full((n,), s, dtype=torch.float32, device=device)
                points[s] = noisy_input(x0, noise, sigma)
                base[s] = dit(points[s], sigma, context).float()
        with at_strength(network, strength):
            for s in sigmas:
                sigma = torch.full((n,), s, dtype=torch.float32, device=device)
                adapted = dit(points[s], sigma, context).float()
                dims = tuple(range(1, adapted.dim()))
                denominator = base[s].square().sum(dim=dims)
                if not bool((denominator > 0).all()):
                    raise ValueError(f"{name}: the base model's velocity is exactly zero at σ={s:g} (a DiT with a "
                                     "zeroed output layer?), so the relative change is undefined")
                ratios[s].append((adapted - base[s]).square().sum(dim=dims) / denominator)
    per_sigma = tuple(float(torch.cat(ratios[s]).double().mean()) for s in sigmas)
    return SigmaMetric(name, sigmas, per_sigma, sum(per_sigma) / len(per_sigma), len(pairs), float(strength))


def preservation_drift(dit: nn.Module, network: nn.Module, contexts: torch.Tensor | Sequence[torch.Tensor],
                       **kwargs) -> SigmaMetric:
    """`velocity_change` on prompts **without** the trigger: how much the network moves what it should leave
    alone.  kwargs: seeds, sigmas, strength, latent_size, batch_size, device."""
    return velocity_change(dit, network, contexts, name="preservation_drift", **kwargs)


def trigger_response(dit: nn.Module, network: nn.Module, contexts: torch.Tensor | Sequence[torch.Tensor],
                     **kwargs) -> SigmaMetric:
    """`velocity_change` on prompts **with** the trigger: how much the network moves what it was trained for."""
    return velocity_change(dit, network, contexts, name="trigger_response", **kwargs)


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; NaN when the denominator is 0 (no response: the ratio says nothing)."""
    return numerator / denominator if denominator != 0 else math.nan


def leak_score(drift: SigmaMetric, response: SigmaMetric) -> SigmaMetric:
    """drift / response per σ bucket, and overall = drift.overall / response.overall (the ratio of the two
    means, not a mean of ratios).  0: nothing leaks; 1: prompts without the trigger change as much as prompts
    with it.  NaN where the response is 0.  Both must share the σ set and the strength; `samples` is the
    drift's."""
    if drift.sigmas != response.sigmas:
        raise ValueError(f"leak score: drift and response were measured at different σ sets ({drift.sigmas} vs "
                         f"{response.sigmas})")
    if drift.strength != response.strength:
        raise ValueError(f"leak score: drift (strength {drift.strength}) and response (strength "
                         f"{response.strength}) were measured at different strengths")
    per_sigma = tuple(_ratio(d, r) for d, r in zip(drift.per_sigma, response.per_sigma, strict=True))
    return SigmaMetric("leak_score", drift.sigmas, per_sigma, _ratio(drift.overall, response.overall),
                       drift.samples, drift.strength)
