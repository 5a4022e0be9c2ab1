"""Held-out flow loss per σ bucket: the loss of the adapted DiT on images it never trained on, with everything
random fixed, so two checkpoints (or a checkpoint and the base) are compared on exactly the same problem.

The training run's validation (train/validation.py) is this measurement: the same batches, σ set, noise and
arithmetic, so `val/loss` in a run's log and `heldout_loss` computed later by evaluation agree to the bit for
the same weights and settings.
  * images and captions: a `data.validation.ValidationSet` (no augmentation, no caption randomness), encoded
    once (`heldout_batches`) and kept on the CPU in fp32;
  * σ: each item at every value of `VALIDATION_SIGMAS` = 0.2, 0.4, 0.6, 0.8 — kohya's validation timesteps
    200/400/600/800 as σ = t / 1000, unshifted (discrete_flow_shift / timestep_sampling do not apply);
  * noise: one ε per item, from its own CPU generator seeded with the item's `noise_seed`, shared by all σ;
  * loss: the training `loss_type` / `huber_c`, unweighted (`weighting_scheme` does not apply), under
    `torch.no_grad` inside a forked RNG seeded with `seed`: the caller's RNG state is the same afterwards.
Bucket value = mean over items of the per-item loss at that σ; overall = mean of the buckets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from anima_trainer.cache.build import latent_mask
from anima_trainer.evaluation.results import SigmaMetric
from anima_trainer.evaluation.strength import at_strength
from anima_trainer.models.flow_maths import flow_loss, noisy_input

# kohya's validation timesteps 200 / 400 / 600 / 800 (of 1000) as flow-matching σ; also drift's default σ set
VALIDATION_SIGMAS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)


@dataclass(frozen=True)
class HeldoutSettings:
    """What a held-out loss depends on besides the batches: the seed of its forked RNG, the loss and the number
    of batches used (None: all).  `of_run` gives a training run's, so evaluation repeats its `val/loss`."""

    seed: int = 0
    loss_type: str = "l2"
    huber_c: float = 0.1
    max_batches: int | None = None

    @classmethod
    def of_run(cls, cfg, seed: int) -> HeldoutSettings:
        """A run's validation settings from its `TrainConfig` and run seed: validation_seed (else the run seed),
        loss_type, huber_c and max_validation_steps."""
        return cls(cfg.validation_seed if cfg.validation_seed is not None else seed, cfg.loss_type, cfg.huber_c,
                   cfg.max_validation_steps)

    def as_dict(self) -> dict:
        return {"seed": self.seed, "loss_type": self.loss_type, "huber_c": self.huber_c,
                "max_batches": self.max_batches}


@dataclass
class HeldoutBatch:
    """One fixed held-out batch, on the CPU: latents and noise [B, 16, 1, h, w] fp32, captions, loss mask."""

    latents: torch.Tensor
    noise: torch.Tensor
    captions: list[str]
    mask: torch.Tensor | None  # [B, 1, 1, h, w] at latent resolution (alpha_mask), or None


def check_sigmas(sigmas: Sequence[float], what: str = "evaluation") -> tuple[float, ...]:
    """The σ set as floats; ValueError (naming `what` measures them) unless it is non-empty and inside (0, 1)."""
    if not sigmas or not all(0.0 < s < 1.0 for s in sigmas):
        raise ValueError(f"{what} σ values must lie in (0, 1), got {tuple(sigmas)}")
    return tuple(float(s) for s in sigmas)


@torch.no_grad()
def heldout_batches(validation, encode: Callable[[torch.Tensor], torch.Tensor], *,
                    device: torch.device | str = "cpu", max_batches: int | None = None) -> list[HeldoutBatch]:
    """Encode the first `max_batches` batches of a `data.validation.ValidationSet` once (`encode`: images
    [B, 3, H, W] in [0, 1] on `device` → latents [B, 16, 1, h, w], e.g. `vae.encode`) and draw their fixed
    noise (item i's from `validation.noise_seed(i)`)."""
    plan = validation.batches()
    if max_batches is not None:
        plan = plan[:max_batches]
    batches = []
    for indices in plan:
        batch = validation.load_batch(indices)
        latents = encode(batch.images.to(device)).float().cpu()
        noise = torch.stack([
            torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(validation.noise_seed(i)))
            for i in indices])
        mask = None if batch.masks is None else latent_mask(batch.masks, latents.shape[-2:])
        batches.append(HeldoutBatch(latents, noise, list(batch.captions), mask))
    return batches


def heldout_loss(dit: nn.Module, batches: Sequence[HeldoutBatch], context_fn: Callable[[list[str]], torch.Tensor],
                 device: torch.device | str, *, sigmas: Sequence[float] = VALIDATION_SIGMAS, seed: int = 0,
                 loss_type: str = "l2", huber_c: float = 0.1, network: nn.Module | None = None,
                 strength: float | None = None) -> SigmaMetric:
    """The flow loss of `dit` (with whatever network is injected) on the fixed batches, per σ bucket and
    overall (`name` "heldout_loss").  `context_fn(captions)` → DiT context.  With `network` the network is put
    in eval mode for the measurement (and at multiplier `strength` when given: 0 measures the base); without it
    that is the caller's job, as validation does."""
    if not batches:
        raise ValueError("the held-out loss needs at least one batch")
    sigmas = check_sigmas(sigmas)
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    sums = dict.fromkeys(sigmas, 0.0)
    count = 0
    with at_strength(network, strength), torch.random.fork_rng(devices=cuda), torch.no_grad():
        # anything random in the model (nothing in eval mode) repeats; only the forked generators are seeded
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        for batch in batches:
            latents, noise = batch.latents.to(device), batch.noise.to(device)
            mask = None if batch.mask is None else batch.mask.to(device)
            context = context_fn(batch.captions)
            n = latents.shape[0]
            for s in sigmas:
                sigma = torch.full((n,), s, dtype=torch.float32, device=device)
                pred = dit(noisy_input(latents, noise, sigma), sigma, context)
                loss = flow_loss(pred, noise - latents, sigma, loss_type=loss_type, huber_c=huber_c,
                                 weighting_scheme="uniform", mask=mask)
                sums[s] += float(loss) * n
            count += n
    per_sigma = tuple(total / count for total in sums.values())
    return SigmaMetric("heldout_loss", sigmas, per_sigma, sum(per_sigma) / len(per_sigma), count,
                       None if network is None else strength)
