"""Preservation drift, trigger response and the leak score (evaluation/drift.py) on the small random DiT: the
formula (mean of per-sample ratios), exact zeros where the network changes nothing, determinism, the quadratic
growth with the strength, and the network left as it was."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from anima_trainer.evaluation import (
    SigmaMetric,
    leak_score,
    preservation_drift,
    trigger_response,
    velocity_change,
)
from anima_trainer.models.flow_maths import noisy_input
from anima_trainer.networks import create_network
from anima_trainer.sample.sampler import initial_noise
from tests.support.small_dit import SMALL, lora, small_dit

LATENT = (8, 8)
SEEDS = (11, 12)


def _contexts(prompts: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.randn(prompts, 64, SMALL.crossattn_dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    dit = small_dit()
    return dit, lora(dit)


def _drift(dit, net, contexts, **kw) -> SigmaMetric:
    return preservation_drift(dit, net, contexts, **{"seeds": SEEDS, "latent_size": LATENT, **kw})


def test_strength_zero_and_a_zero_update_give_exactly_zero(model):
    dit, net = model
    at_zero = _drift(dit, net, _contexts(), strength=0.0)
    assert at_zero.per_sigma == (0.0, 0.0, 0.0, 0.0) and at_zero.overall == 0.0
    assert at_zero.strength == 0.0 and at_zero.samples == 3 * len(SEEDS)
    fresh = small_dit()
    untrained = create_network(fresh, dim=4, alpha=4)  # LoRA up factors start at zero: ΔW = 0
    zero = _drift(fresh, untrained, _contexts(), strength=1.0)
    assert zero.overall == 0.0 and set(zero.per_sigma) == {0.0}
    assert _drift(dit, net, _contexts()).overall > 0


def test_mean_of_per_sample_ratios(model):
    """Each bucket is the mean over (prompt, seed) of ‖v_adapted − v_base‖² / ‖v_base‖², the probe point being
    x_σ = (1 − σ)·x̂0 + σ·ε with x̂0 = ε − v_base(ε, 1) (checked against a direct computation)."""
    dit, net = model
    contexts = _contexts(2)
    got = trigger_response(dit, net, contexts, seeds=SEEDS, sigmas=(0.3, 0.9), latent_size=LATENT, batch_size=3)
    assert got.name == "trigger_response" and got.sigmas == (0.3, 0.9) and got.samples == 4
    expected: dict[float, list[float]] = {0.3: [], 0.9: []}
    numerators: dict[float, list[float]] = {0.3: [], 0.9: []}
    denominators: dict[float, list[float]] = {0.3: [], 0.9: []}
    with torch.no_grad():
        for p in range(2):
            for seed in SEEDS:
                eps = initial_noise((16, 1, *LATENT), seed)[None]
                ctx = contexts[p:p + 1]
                net.set_multiplier(0.0)
                x0 = eps - dit(eps, torch.ones(1), ctx)
                for s in expected:
                    sigma = torch.full((1,), s)
                    x = noisy_input(x0, eps, sigma)
                    net.set_multiplier(0.0)
                    base = dit(x, sigma, ctx)
                    net.set_multiplier(1.0)
                    adapted = dit(x, sigma, ctx)
                    numerators[s].append(float((adapted - base).square().sum()))
                    denominators[s].append(float(base.square().sum()))
                    expected[s].append(numerators[s][-1] / denominators[s][-1])
    for s in expected:
        mean_ratio = sum(expected[s]) / len(expected[s])
        assert got.at(s) == pytest.approx(mean_ratio, rel=1e-4)
        ratio_of_means = sum(numerators[s]) / sum(denominators[s])
        assert not math.isclose(mean_ratio, ratio_of_means, rel_tol=1e-3)  # the test tells the two apart
    assert got.overall == pytest.approx((got.at(0.3) + got.at(0.9)) / 2, rel=1e-12)


def test_deterministic_for_a_seed_and_different_for_another(model):
    dit, net = model
    first = _drift(dit, net, _contexts())
    assert _drift(dit, net, _contexts()) == first  # bit-identical numbers
    other = _drift(dit, net, _contexts(), seeds=(13, 14))
    assert all(a != b for a, b in zip(first.per_sigma, other.per_sigma))
    batched = _drift(dit, net, _contexts(), batch_size=1)  # batching changes nothing but rounding
    assert batched.per_sigma == pytest.approx(first.per_sigma, rel=1e-4)
    as_list = _drift(dit, net, list(_contexts()), device="cpu")  # P contexts [L, D] instead of one [P, L, D]
    assert as_list == first


def test_grows_with_the_square_of_the_strength():
    """For a small update v_adapted − v_base ≈ m·J·ΔW, so the drift at multiplier m is ≈ m² × the drift at 1."""
    dit = small_dit()
    net = lora(dit)
    with torch.no_grad():
        for m in net.lora_modules:
            m.lora_up.weight.mul_(1e-3)
    at = {m: _drift(dit, net, _contexts(), strength=m).overall for m in (0.5, 1.0, 2.0)}
    assert at[0.5] / at[1.0] == pytest.approx(0.25, rel=1e-2)
    assert at[2.0] / at[1.0] == pytest.approx(4.0, rel=1e-2)


def test_network_is_left_as_it_was(model):
    dit, net = model
    net.train()
    net.set_multiplier(0.7)
    try:
        state = torch.get_rng_state()
        _drift(dit, net, _contexts(), strength=1.0)
        assert net.training and all(m.multiplier == 0.7 for m in net.lora_modules)
        assert torch.equal(torch.get_rng_state(), state)  # draws only from its own generators
    finally:
        net.eval()
        net.set_multiplier(1.0)


def test_leak_score_is_the_ratio_and_serialises(model):
    dit, net = model
    contexts = _contexts()
    drift = _drift(dit, net, contexts[:2])
    response = trigger_response(dit, net, contexts[1:], seeds=SEEDS, latent_size=LATENT)
    leak = leak_score(drift, response)
    assert leak.name == "leak_score" and leak.sigmas == drift.sigmas
    assert leak.per_sigma == tuple(d / r for d, r in zip(drift.per_sigma, response.per_sigma))
    assert leak.overall == drift.overall / response.overall  # ratio of the two means
    same = leak_score(drift, SigmaMetric("trigger_response", drift.sigmas, drift.per_sigma, drift.overall,
                                         drift.samples, drift.strength))
    assert same.per_sigma == (1.0,) * 4 and same.overall == 1.0
    text = json.dumps([m.as_dict() for m in (drift, response, leak)], allow_nan=False)
    assert [SigmaMetric.from_dict(d) for d in json.loads(text)] == [drift, response, leak]
    assert drift.scalars()["eval/preservation_drift"] == drift.overall
    assert drift.scalars("eval/drift")["eval/drift_sigma_0.6"] == drift.at(0.6)
    # no response at all: the leak is undefined (NaN, null in JSON), not a division error
    zero = _drift(dit, net, contexts, strength=0.0)
    undefined = leak_score(zero, SigmaMetric("trigger_response", zero.sigmas, zero.per_sigma, 0.0, 6, 0.0))
    assert math.isnan(undefined.overall) and undefined.as_dict()["overall"] is None
    assert undefined.as_dict()["per_sigma"] == {"0.2": None, "0.4": None, "0.6": None, "0.8": None}
    with pytest.raises(ValueError, match="different strengths"):
        leak_score(drift, zero)
    with pytest.raises(ValueError, match="different σ sets"):
        leak_score(drift, trigger_response(dit, net, contexts, seeds=SEEDS, sigmas=(0.5,), latent_size=LATENT))


class _ZeroDiT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x, sigma, context):
        return torch.zeros_like(x)


class _Net(nn.Module):
    multiplier = 1.0

    def set_multiplier(self, m: float) -> None:
        self.multiplier = m


def test_refuses_what_it_cannot_measure(model):
    dit, net = model
    with pytest.raises(ValueError, match="base model's velocity is exactly zero"):
        velocity_change(_ZeroDiT(), _Net(), _contexts(), seeds=SEEDS, latent_size=LATENT)
    with pytest.raises(ValueError, match="at least one seed"):
        _drift(dit, net, _contexts(), seeds=())
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        _drift(dit, net, _contexts(), sigmas=(0.0, 0.5))
    with pytest.raises(ValueError, match="one shape"):
        _drift(dit, net, [torch.zeros(64, 32), torch.zeros(32, 32)])
