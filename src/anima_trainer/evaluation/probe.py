"""The light metrics: what `eval_every_n_*` logs during training and what `anima-trainer eval` reports per strength,
computed by one function so the two agree to the bit for the same weights, prompts and device.

A `ProbeSet` fixes everything a drift measurement depends on: the prompts without the trigger and the same
prompts with it (`prompt_bank.trigger_pairs`), encoded once by the frozen text encoder in one batch each, the
seeds, the σ set, the probe's latent size and the batch size.  `measure_at_strength` gives preservation drift,
trigger response and their ratio, the leak score, at one multiplier; `light_metrics` adds the held-out loss on
fixed batches when there are any.  Without a trigger only the drift is measured (every bank prompt counts as one
without the trigger); the response and the leak score are then None.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from anima_trainer.evaluation.drift import PROBE_LATENT_SIZE, leak_score, preservation_drift, trigger_response
from anima_trainer.evaluation.heldout import VALIDATION_SIGMAS, HeldoutBatch, check_sigmas, heldout_loss
from anima_trainer.evaluation.prompt_bank import trigger_pairs
from anima_trainer.evaluation.results import SigmaMetric

# two seeds per prompt: with the 16 built-in prompts 32 probes per σ, enough to rank checkpoints, cheap enough to
# run at every save
PROBE_SEEDS: tuple[int, ...] = (0, 1)
METRIC_NAMES = ("heldout_loss", "preservation_drift", "trigger_response", "leak_score")


@dataclass
class ProbeSet:
    """The fixed probe of drift and response: encoded contexts [P, L, D] of the prompts without the trigger and
    (when there is a trigger) of the same prompts with it, their texts, and the seeds, σ set, latent size and
    batch size every measurement uses."""

    texts_without: list[str]
    contexts_without: torch.Tensor
    trigger: str | None = None
    texts_with: list[str] | None = None
    contexts_with: torch.Tensor | None = None
    seeds: tuple[int, ...] = PROBE_SEEDS
    sigmas: tuple[float, ...] = VALIDATION_SIGMAS
    latent_size: tuple[int, int] = PROBE_LATENT_SIZE
    batch_size: int = 8

    @classmethod
    @torch.no_grad()
    def encode(cls, texts: Sequence[str], context_fn: Callable[[list[str]], torch.Tensor], *,
               trigger: str | None = None, seeds: Sequence[int] = PROBE_SEEDS,
               sigmas: Sequence[float] = VALIDATION_SIGMAS, latent_size: tuple[int, int] = PROBE_LATENT_SIZE,
               batch_size: int = 8) -> ProbeSet:
        """Encode the probe's prompts: with a trigger, the bank prompts that do not mention it and the same
        prompts with it put in (`trigger_pairs`); without one, every prompt as written.  `context_fn(texts)` →
        [P, L, D] in one call per set (the training loop's `TextConditioner.context`, or `encode_prompts`), kept
        on the CPU in fp32 so a probe built once serves the whole run."""
        if trigger is not None and trigger.strip():
            without, with_ = trigger_pairs(list(texts), trigger)
            if not without:
                raise ValueError(f"every probe prompt mentions the trigger {trigger!r}: preservation drift needs "
                                 "prompts without it (add some, or use the built-in bank)")
        else:
            trigger, without, with_ = None, list(texts), None
        if not without:
            raise ValueError("the probe needs at least one prompt")
        if not seeds:
            raise ValueError("the probe needs at least one seed")

        def encoded(batch: list[str]) -> torch.Tensor:
            return context_fn(batch).detach().float().cpu()

        return cls(without, encoded(without), trigger, with_, None if with_ is None else encoded(with_),
                   tuple(int(s) for s in seeds), check_sigmas(sigmas, "probe"), tuple(latent_size), batch_size)

    @property
    def has_trigger(self) -> bool:
        return self.contexts_with is not None

    def settings(self) -> dict:
        """Plain JSON of what the numbers depend on (for results files and the event log)."""
        return {"trigger": self.trigger, "prompts_without_trigger": self.texts_without,
                "prompts_with_trigger": self.texts_with, "seeds": list(self.seeds), "sigmas": list(self.sigmas),
                "latent_size": list(self.latent_size), "batch_size": self.batch_size}


@dataclass(frozen=True)
class StrengthMetrics:
    """Drift, response and leak score of one network at one strength (response and leak None without a
    trigger)."""

    strength: float
    preservation_drift: SigmaMetric
    trigger_response: SigmaMetric | None = None
    leak_score: SigmaMetric | None = None

    def metrics(self) -> dict[str, SigmaMetric]:
        """The measured ones by name."""
        return {m.name: m for m in (self.preservation_drift, self.trigger_response, self.leak_score)
                if m is not None}

    def as_dict(self) -> dict:
        return {"strength": self.strength, **{name: m.as_dict() for name, m in self.metrics().items()}}

    @classmethod
    def from_dict(cls, data: dict) -> StrengthMetrics:
        def read(name: str) -> SigmaMetric | None:
            return None if data.get(name) is None else SigmaMetric.from_dict(data[name])

        return cls(float(data["strength"]), read("preservation_drift"), read("trigger_response"),
                   read("leak_score"))


def measure_at_strength(dit: nn.Module, network: nn.Module, probe: ProbeSet, strength: float = 1.0, *,
                        device: torch.device | str | None = None) -> StrengthMetrics:
    """Preservation drift (and with a trigger: trigger response and leak score) of `network`, injected into
    `dit`, at multiplier `strength`; multipliers and training mode are restored afterwards."""
    kwargs = dict(seeds=probe.seeds, sigmas=probe.sigmas, strength=strength, latent_size=probe.latent_size,
                  batch_size=probe.batch_size, device=device)
    drift = preservation_drift(dit, network, probe.contexts_without, **kwargs)
    if not probe.has_trigger:
        return StrengthMetrics(float(strength), drift)
    response = trigger_response(dit, network, probe.contexts_with, **kwargs)
    return StrengthMetrics(float(strength), drift, response, leak_score(drift, response))


def light_metrics(dit: nn.Module, network: nn.Module, probe: ProbeSet, *,
                  heldout: Sequence[HeldoutBatch] | None = None,
                  context_fn: Callable[[list[str]], torch.Tensor] | None = None, device: torch.device | str,
                  seed: int = 0, loss_type: str = "l2", huber_c: float = 0.1,
                  strength: float = 1.0) -> dict[str, SigmaMetric]:
    """The light metrics of `network` at `strength`, by name (`METRIC_NAMES` order): the held-out loss on
    `heldout` (with `context_fn` for its captions; left out without batches), then drift, response, leak."""
    out: dict[str, SigmaMetric] = {}
    if heldout:
        if context_fn is None:
            raise ValueError("the held-out loss needs context_fn for its captions")
        out["heldout_loss"] = heldout_loss(dit, heldout, context_fn, device, sigmas=probe.sigmas, seed=seed,
                                           loss_type=loss_type, huber_c=huber_c, network=network, strength=strength)
    out.update(measure_at_strength(dit, network, probe, strength, device=device).metrics())
    return out


def metric_scalars(metrics: dict[str, SigmaMetric], prefix: str = "eval") -> dict[str, float]:
    """{prefix/name: overall, prefix/name_sigma_<σ>: ...} of every metric: what TensorBoard and the event log get."""
    out: dict[str, float] = {}
    for name, metric in metrics.items():
        out.update(metric.scalars(f"{prefix}/{name}"))
    return out
