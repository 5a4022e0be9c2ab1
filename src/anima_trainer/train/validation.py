"""Validation loss on the held-out images (validation_split), comparable over a run.

A training loss curve mixes random σ, random noise and random captions; a validation loss that should show
over- or underfitting must not.  So everything is fixed at start-up, once (`Validator.build`), and the loss is
evaluation/heldout.py's held-out flow loss — the definition evaluation uses too, so their numbers agree:
  * the images and captions of `data.validation.ValidationSet` (no augmentation, no caption randomness);
  * their latents: encoded once with the VAE and kept on the CPU in fp32 (held-out images are few; the
    training latent cache never contains them);
  * σ: every item is evaluated at each of `VALIDATION_SIGMAS` = 0.2, 0.4, 0.6, 0.8 — kohya's validation
    timesteps 200/400/600/800 as σ = t / 1000, unshifted (discrete_flow_shift / timestep_sampling do not
    apply, so changing them does not move the curve);
  * noise: one ε per item, drawn from its own CPU generator seeded with the item's `noise_seed` (from
    validation_seed), shared by the four σ values.
`run` then computes the flow loss (the training `loss_type` / `huber_c`, unweighted: `weighting_scheme`
does not apply, so the per-σ values are directly comparable) under `torch.no_grad`, inside a forked RNG
seeded with the validation seed: the global torch RNG (CPU and CUDA) is the same afterwards, and the
training generator is never touched.  The result: `val/loss` (mean over all items and σ) and one
`val/loss_sigma_<σ>` per σ.  Putting the network in eval mode (no LoRA dropout) is the caller's job.

When to run (kohya's rules, `due_at_step` / `due_at_epoch`): after every `validate_every_n_steps`-th
optimizer step when set, and at the end of every `validate_every_n_epochs`-th epoch — every epoch when that
is unset.  `max_validation_steps` caps the number of validation batches (the first ones of the fixed plan).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from anima_trainer.config import ConfigError
from anima_trainer.data.validation import ValidationSet
from anima_trainer.evaluation.heldout import (
    VALIDATION_SIGMAS,
    HeldoutBatch,
    HeldoutSettings,
    check_sigmas,
    heldout_batches,
    heldout_loss,
)
from anima_trainer.evaluation.results import sigma_scalar_key

log = logging.getLogger(__name__)

LOSS_KEY = "val/loss"


def sigma_key(sigma: float) -> str:
    """Log key of one σ band, e.g. `val/loss_sigma_0.2`."""
    return sigma_scalar_key(LOSS_KEY, sigma)


class Validator:
    """Fixed validation batches + σ values; `run` gives the validation losses."""

    def __init__(self, batches: list[HeldoutBatch], *, sigmas: tuple[float, ...] = VALIDATION_SIGMAS,
                 seed: int = 0, loss_type: str = "l2", huber_c: float = 0.1,
                 every_n_steps: int | None = None, every_n_epochs: int | None = None) -> None:
        if not batches:
            raise ValueError("a Validator needs at least one validation batch")
        self.batches, self.sigmas, self.seed = batches, check_sigmas(sigmas, "validation"), seed
        self.loss_type, self.huber_c = loss_type, huber_c
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs

    @property
    def num_items(self) -> int:
        return sum(len(b.captions) for b in self.batches)

    @classmethod
    @torch.no_grad()
    def build(cls, validation, encode: Callable[[torch.Tensor], torch.Tensor], *, device: torch.device | str = "cpu",
              max_batches: int | None = None, **kwargs) -> Validator:
        """Encode the first `max_batches` batches of a `data.validation.ValidationSet` once (`encode`: images
        [B, 3, H, W] in [0, 1] on `device` → latents [B, 16, 1, h, w], e.g. `vae.encode`) and draw their fixed
        noise.  `kwargs` go to the constructor (sigmas, seed, loss_type, huber_c, every_n_*)."""
        batches = heldout_batches(validation, encode, device=device, max_batches=max_batches)
        return cls(batches, **kwargs)

    def due_at_step(self, step: int) -> bool:
        """True after optimizer step `step` (1-based) when validate_every_n_steps divides it."""
        return bool(self.every_n_steps) and step > 0 and step % self.every_n_steps == 0

    def due_at_epoch(self, epoch: int) -> bool:
        """True at the end of epoch `epoch` (1-based): every validate_every_n_epochs-th, every epoch if unset
        (kohya)."""
        return self.every_n_epochs is None or epoch % self.every_n_epochs == 0

    def run(self, dit: torch.nn.Module, context_fn: Callable[[list[str]], torch.Tensor],
            device: torch.device | str) -> dict[str, float]:
        """{"val/loss": mean, "val/loss_sigma_0.2": ..., ...} of `dit` (with its injected network) on the fixed
        batches; `context_fn(captions)` → DiT context (the loop's `TextConditioner.context`).  The RNG state
        of the caller is unchanged afterwards."""
        metric = heldout_loss(dit, self.batches, context_fn, device, sigmas=self.sigmas, seed=self.seed,
                              loss_type=self.loss_type, huber_c=self.huber_c)
        return metric.scalars(LOSS_KEY)


def check_validation(cfg, dataset) -> bool:
    """Whether the run validates (some dataset holds images out).  Call right after `build_dataset`, before
    loading models: validate_every_n_steps / validate_every_n_epochs without any held-out image is a
    ConfigError naming validation_split."""
    if dataset.validation_items:
        return True
    for key in ("validate_every_n_steps", "validate_every_n_epochs"):
        if getattr(cfg, key, None):
            raise ConfigError(f"{key}: no validation images; set validation_split (train args, or [general] / "
                              f"[[datasets]] in the dataset_config) to hold some out")
    if getattr(cfg, "max_validation_steps", None):
        log.info("max_validation_steps has no effect: no validation_split")
    return False


def build_validator(cfg, dataset, encode: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str,
                    seed: int) -> Validator | None:
    """The run's Validator from the TrainConfig and the built dataset (`check_validation` first), or None when
    nothing is held out.  `encode` = `vae.encode`; `seed` = the training seed (default validation seed)."""
    if not check_validation(cfg, dataset):
        return None
    validation = ValidationSet.from_dataset(dataset)
    settings = HeldoutSettings.of_run(cfg, seed)  # what `anima-trainer eval` uses for the same numbers
    validator = Validator.build(validation, encode, device=device, max_batches=settings.max_batches,
                                seed=settings.seed, loss_type=settings.loss_type, huber_c=settings.huber_c,
                                every_n_steps=cfg.validate_every_n_steps, every_n_epochs=cfg.validate_every_n_epochs)
    log.info("validation: %d held-out image(s) in %d batch(es) (of %d), σ = %s", validator.num_items,
             len(validator.batches), len(validation), ", ".join(f"{s:g}" for s in validator.sigmas))
    return validator
