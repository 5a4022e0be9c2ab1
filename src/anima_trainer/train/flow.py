"""Rectified-flow training maths: timestep sampling, kohya's noise options, and the objective itself
(`training_step`, with each sample's noise seeded by `sample_seed`).  The noising and the loss (`noisy_input`,
`flow_loss`) live in models/flow_maths.py, shared with the held-out measurements; they are imported here.

Conventions (docs/anima_arch.md §7, kohya_anima.md §4.2–4.3): x_σ = (1−σ)·x0 + σ·ε, target v = ε − x0,
the DiT receives σ ∈ [0, 1] in **fp32** (kohya rounds it to bf16 first; we do not).

Differential output preservation (`Preservation`, `preservation_term`; docs/evaluation.md): on a preservation
step the adapted prediction on prompts without the trigger is pulled toward the base's, at the step's own x_σ, σ.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

# the noising and the loss, shared with the held-out measurements (evaluation/heldout.py)
from anima_trainer.evaluation.strength import at_strength  # the network at multiplier 0 = the frozen base
from anima_trainer.models.flow_maths import flow_loss, noisy_input
from anima_trainer.sample.sampler import shift_sigma  # the σ shift ComfyUI samples with
from anima_trainer.train.inputs import to_device

TIMESTEP_SAMPLINGS = ("sigmoid", "uniform", "sigma", "shift", "flux_shift")
WEIGHTING_SCHEMES = ("uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


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


# --- kohya's noise and timestep options (issue 14) ------------------------------------------------------------
# kohya's generic formulas (library/train_util.get_noise_noisy_latents_and_timesteps, custom_train_functions.
# apply_noise_offset / pyramid_noise_like) and its flow path's input perturbation (flux_train_utils.
# get_noisy_model_input_and_timesteps).  Every draw comes from the one generator of the sample (or batch) being
# noised, so a sample's noise stays a function of its own seed: exact resume and data-parallel equivalence.


@dataclass(frozen=True)
class NoiseOptions:
    """The noise/timestep options of a run, as `draw_noise_and_sigma` applies them (None / 0 = off)."""

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> NoiseOptions:
        """The options of a TrainConfig (or anything with the same attribute names; missing = off)."""
        return cls(**{f.name: getattr(cfg, f.name, f.default) for f in fields(cls)})


def offset_noise(noise: torch.Tensor, x0: torch.Tensor, offset: float, generator: torch.Generator, *,
                 random_strength: bool = False, adaptive_scale: float | None = None) -> torch.Tensor:
    """kohya's noise offset: ε + o·z with z ~ N(0,1) per (sample, channel), constant over T, H, W.

    With `random_strength` o = U(0,1)·offset per sample (kohya draws one per batch; one per sample keeps the
    noise a function of the sample's seed).  With `adaptive_scale` o += scale·|mean of x0 over T,H,W| per
    channel, clamped at 0 (kohya's `adaptive_noise_scale`).  The draws: U (if random) then z."""
    n, c = noise.shape[:2]
    ones = [1] * (noise.dim() - 2)
    o = torch.full((n, 1), float(offset))
    if random_strength:
        o = torch.rand(n, 1, generator=generator, device=generator.device).cpu() * offset
    o = o.view(n, 1, *ones).to(noise.device)
    if adaptive_scale is not None:
        mean = x0.float().mean(dim=tuple(range(2, x0.dim())), keepdim=True).abs().to(noise.device)
        o = (o + adaptive_scale * mean).clamp(min=0.0)
    z = torch.randn((n, c, *ones), generator=generator, device=generator.device).to(noise.device)
    return noise + o * z


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int,
                  discount: float = 0.3) -> torch.Tensor:
    """kohya's multires (pyramid) noise: for i = 0 … iterations−1, add bilinear-upsampled N(0,1) noise of size
    (H, W)/rⁱ, r ~ U(2, 4) per level, × discountⁱ; stop after a level with a side of 1; rescale to unit std.

    Differences from kohya, both to keep a sample's noise a function of its own seed: r and the levels come
    from `generator` (kohya: Python's `random` and torch's global RNG), and each sample is divided by its own
    std (kohya: the std of the whole batch).  T frames (T = 1 for images) are noised as separate channels."""
    shape = noise.shape
    n, h, w = shape[0], shape[-2], shape[-1]
    x = noise.reshape(n, -1, h, w).clone()
    up = torch.nn.Upsample(size=(h, w), mode="bilinear")
    for i in range(iterations):
        r = float(torch.rand((), generator=generator, device=generator.device)) * 2 + 2
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        level = torch.randn((n, x.shape[1], hn, wn), generator=generator, device=generator.device)
        x = x + up(level.to(x.device, x.dtype)) * discount ** i
        if hn == 1 or wn == 1:
            break
    x = x / x.reshape(n, -1).std(dim=1).view(n, 1, 1, 1)
    return x.reshape(shape)


def timestep_range(sigma: torch.Tensor, min_timestep: int | None, max_timestep: int | None) -> torch.Tensor:
    """kohya's `min_timestep`/`max_timestep` (0…1000 = σ·1000) for flow matching: σ ∈ [0, 1] from any
    `timestep_sampling` is mapped affinely onto [min/1000, max/1000] (kohya's flow trainers, e.g. musubi-tuner:
    t·(t_max − t_min) + t_min, which keeps the shape of the distribution); min = max fixes σ = min/1000."""
    if min_timestep in (None, 0) and max_timestep in (None, 1000):
        return sigma  # the full range: σ unchanged (GUIs write max_timestep = 1000)
    lo = (min_timestep if min_timestep is not None else 0) / 1000.0
    hi = (max_timestep if max_timestep is not None else 1000) / 1000.0
    return sigma * (hi - lo) + lo


def draw_noise_and_sigma(n: int, shape: tuple[int, ...], generator: torch.Generator, options: NoiseOptions, *,
                         x0: torch.Tensor | None = None, **sigma_kwargs: Any
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ε, σ, ε_in) for `n` samples of latent `shape` (C, T, H, W), all drawn from `generator`, in this order:
    ε ~ N(0, I), σ (`sample_sigmas(**sigma_kwargs)`), then only where enabled: the noise offset (strength,
    z), the multires levels, the input perturbation (strength, ξ).  ε is the noise of the target v = ε − x0
    (with offset/multires); ε_in = ε + γ·ξ is the noise of the model input (kohya's `ip_noise_gamma`: the
    input is perturbed, the target is not).  `x0` (the n samples' latents) is needed for adaptive_noise_scale.
    With every option off the draws are exactly ε then σ (runs from before these options are unchanged)."""
    gen_device = generator.device
    noise = torch.randn((n, *shape), generator=generator, device=gen_device)
    sigma = sample_sigmas(n, generator=generator, device=gen_device, **sigma_kwargs)
    sigma = timestep_range(sigma, options.min_timestep, options.max_timestep)
    if options.noise_offset:
        if options.adaptive_noise_scale is not None and x0 is None:
            raise ValueError("adaptive_noise_scale needs the latents (x0)")
        noise = offset_noise(noise, x0 if x0 is not None else noise, options.noise_offset, generator,
                             random_strength=options.noise_offset_random_strength,
                             adaptive_scale=options.adaptive_noise_scale)
    if options.multires_noise_iterations:
        noise = pyramid_noise(noise, generator, options.multires_noise_iterations, options.multires_noise_discount)
    noise_in = noise
    if options.ip_noise_gamma:
        gamma = torch.full((n,), float(options.ip_noise_gamma))
        if options.ip_noise_gamma_random_strength:
            gamma = torch.rand(n, generator=generator, device=gen_device).cpu() * options.ip_noise_gamma
        xi = torch.randn((n, *shape), generator=generator, device=gen_device)
        noise_in = noise + gamma.view(n, *([1] * len(shape))).to(xi.device) * xi
    return noise, sigma, noise_in


def sample_seed(seed: int, epoch: int, index: int, occurrence: int) -> int:
    """The noise/σ seed of one sample: a hash of (seed, epoch, dataset item, occurrence in the epoch)."""
    digest = hashlib.blake2b(f"anima-trainer/noise/{seed}/{epoch}/{index}/{occurrence}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def training_step(dit: torch.nn.Module, latents: torch.Tensor, context: torch.Tensor, cfg: Any,
                  sample_seeds: list[int], mask: torch.Tensor | None = None,
                  sample_weights: torch.Tensor | None = None,
                  extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """One rectified-flow loss: σ (fp32) → x_σ → v̂ = DiT(x_σ, σ, c) → loss against ε − x0.

    `extra_loss(x_σ, σ)`, when given, is added to the loss: a term at the step's own noisy input (the
    preservation term, `Preservation.term`).

    Each sample's noise and σ come from its own seed (`sample_seed`: the loop derives it from the seed, the
    epoch and the item), so they do not depend on how samples are batched or sharded across processes.  kohya's
    noise options (noise offset, multires, input perturbation, timestep range: `draw_noise_and_sigma`) draw
    from the same per-sample generator."""
    device = latents.device
    patches = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
    options = NoiseOptions.from_config(cfg)  # noise offset, multires, input perturbation, timestep range

    def draw(x0: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return draw_noise_and_sigma(
            1, tuple(latents.shape[1:]), torch.Generator().manual_seed(seed), options, x0=x0,
            method=cfg.timestep_sampling, sigmoid_scale=cfg.sigmoid_scale, shift=cfg.discrete_flow_shift,
            weighting_scheme=cfg.weighting_scheme, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
            mode_scale=cfg.mode_scale, patches=patches)

    if len(sample_seeds) != latents.shape[0]:
        raise ValueError(f"training_step: {len(sample_seeds)} sample seeds for a batch of {latents.shape[0]}")
    drawn = [draw(latents[i:i + 1], s) for i, s in enumerate(sample_seeds)]
    noise, sigma, noise_in = (to_device(torch.cat(parts), device) for parts in zip(*drawn, strict=True))
    x_t = noisy_input(latents, noise_in, sigma)  # ip_noise_gamma perturbs the input only, not the target
    pred = dit(x_t, sigma, context)
    loss = flow_loss(pred, noise - latents, sigma, loss_type=cfg.loss_type, huber_c=cfg.huber_c,
                     weighting_scheme=cfg.weighting_scheme, mask=mask, sample_weights=sample_weights)
    return loss if extra_loss is None else loss + extra_loss(x_t, sigma)


# --- differential output preservation (issue 17) ---------------------------------------------------------------
def preservation_term(dit: torch.nn.Module, network: torch.nn.Module, x_t: torch.Tensor, sigma: torch.Tensor,
                      context: torch.Tensor) -> torch.Tensor:
    """mean((v_adapted − v_base)²) in fp32: v_base = DiT(x_σ, σ, c) with the network's multiplier at 0 and no
    gradient (the frozen base: no second model in memory), v_adapted the same forward with the network on."""
    with torch.no_grad(), at_strength(network, 0.0):
        base = dit(x_t, sigma, context)
    adapted = dit(x_t, sigma, context)
    return F.mse_loss(adapted.float(), base.float())


def preservation_seed(seed: int, step: int, micro_batch: int) -> int:
    """The seed that picks the preservation prompts of one micro-batch: a hash of (seed, step, micro-batch), so
    the choice draws from no shared RNG (exact resume stays bit-identical)."""
    digest = hashlib.blake2b(f"anima-trainer/preservation/{seed}/{step}/{micro_batch}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


@dataclass
class Preservation:
    """The run's preservation loss: the prompts' contexts (encoded once at start-up by the frozen text encoder),
    its weight and how often it applies.  `for_step` gives the loop the `extra_loss` of a micro-batch."""

    dit: torch.nn.Module
    network: torch.nn.Module
    contexts: torch.Tensor  # [P, L, D], one row per preservation prompt
    weight: float
    every_n_steps: int = 1
    seed: int = 0

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) carries the term."""
        return self.weight > 0 and step % self.every_n_steps == 0

    def pick(self, step: int, micro_batch: int, n: int) -> torch.Tensor:
        """`n` prompt indices for a micro-batch: a permutation of the prompts drawn from `preservation_seed`
        (repeated when the batch has more samples than there are prompts)."""
        order = torch.randperm(len(self.contexts), generator=torch.Generator().manual_seed(
            preservation_seed(self.seed, step, micro_batch)))
        return order.repeat(math.ceil(n / len(order)))[:n]

    def for_step(self, step: int, micro_batch: int, record: Callable[[torch.Tensor], None] | None = None
                 ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """The `extra_loss` of `training_step` for this micro-batch (None when `step` has no term): weight × the
        preservation term on the picked prompts; `record` gets the unweighted term (detached) for the logs."""
        if not self.due(step):
            return None

        def term(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            context = self.contexts[self.pick(step, micro_batch, x_t.shape[0]).to(self.contexts.device)]
            value = preservation_term(self.dit, self.network, x_t, sigma, context)
            if record is not None:
                record(value.detach())
            return self.weight * value
        return term


def preservation_texts(cfg: Any) -> list[str] | None:
    """The preservation prompts (None when preservation_loss_weight is 0): preservation_prompts (kohya prompt
    syntax, read and checked by the sample-prompt loader, whose error names the file and place) or the built-in
    bank.  Read at start-up before any model loads, so a bad file costs no model load."""
    if not getattr(cfg, "preservation_loss_weight", 0):
        return None
    from anima_trainer.evaluation.prompt_bank import bank_from_file, builtin_bank

    bank = bank_from_file(cfg.preservation_prompts) if cfg.preservation_prompts else builtin_bank()
    return [entry.text for entry in bank]


def build_preservation(cfg: Any, texts: list[str] | None, dit: torch.nn.Module, network: torch.nn.Module,
                       encode: Callable[[list[str]], torch.Tensor], seed: int) -> Preservation | None:
    """The run's `Preservation` (None without `texts`): the prompts encoded once by `encode` (the run's
    TextConditioner: the frozen text encoder) without gradient."""
    if not texts:
        return None
    with torch.no_grad():
        contexts = encode(texts).detach()
    return Preservation(dit, network, contexts, float(cfg.preservation_loss_weight),
                        cfg.preservation_every_n_steps, seed)


# --- start-up notices: options that do nothing for Anima, or do more here than in kohya's Anima trainer ---------
_NO_FLOW_MEANING = ("kohya's Anima trainer ignores it too (its post_process_loss does nothing for flow matching: "
                    "this loss re-weighting is defined for ε/v-prediction noise schedules); to weight the loss by "
                    "σ here use weighting_scheme = \"sigma_sqrt\" or \"cosmap\"")
_SHIFT_USERS = ("shift", "sigma")  # timestep_sampling methods that read discrete_flow_shift
_SIGMOID_USERS = ("sigmoid", "shift", "flux_shift")  # … that read sigmoid_scale
_DENSITY_SCHEMES = ("logit_normal", "mode")  # weighting schemes that only shape the σ density of `sigma`


def objective_notices(cfg: Any) -> list[str]:
    """One line per noise/timestep/loss option that has no effect for Anima with these settings, or that
    anima-trainer applies where kohya's anima_train_network silently does not (so results differ from kohya)."""
    out: list[str] = []
    g = lambda name, default=None: getattr(cfg, name, default)  # noqa: E731
    if g("min_snr_gamma"):
        out.append(f"min_snr_gamma = {g('min_snr_gamma')}: no effect for Anima; {_NO_FLOW_MEANING}")
    if g("debiased_estimation_loss"):
        out.append(f"debiased_estimation_loss = true: no effect for Anima; {_NO_FLOW_MEANING}")
    if g("v_pred_like_loss"):
        out.append(f"v_pred_like_loss = {g('v_pred_like_loss')}: no effect for Anima; {_NO_FLOW_MEANING}")
    if g("scale_v_pred_loss_like_noise_pred"):
        out.append("scale_v_pred_loss_like_noise_pred = true: no effect for Anima (it rescales a v-prediction "
                   "loss; Anima predicts the flow velocity ε − x0, so there is nothing to rescale)")
    # discrete_flow_shift / sigmoid_scale / weighting_scheme without effect: config/loader.py flow_notices
    applied = [f"{k} = {g(k)}" for k in ("noise_offset", "adaptive_noise_scale", "multires_noise_iterations")
               if g(k)] + [f"{k} = {g(k)}" for k, full in (("min_timestep", 0), ("max_timestep", 1000))
                           if g(k) not in (None, full)]  # the full range 0…1000 changes nothing
    if applied:
        out.append(f"{', '.join(applied)}: applied to the flow-matching noise/σ as kohya's SD trainers do; note "
                   "kohya's own anima_train_network ignores these options, so the same config trains "
                   "differently there")
    return out
