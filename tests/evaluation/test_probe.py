"""The light metrics (evaluation/probe.py) and the results document (evaluation/eval_results.py): the probe pairs
prompts with and without the trigger, the metrics are the drift module's, deterministic, and a results file
reloads equal."""

from __future__ import annotations

import json
import math

import pytest
import torch

from anima_trainer.evaluation import preservation_drift, trigger_response
from anima_trainer.evaluation.eval_results import CheckpointResult, EvalResults, GridImage
from anima_trainer.evaluation.heldout import HeldoutBatch
from anima_trainer.evaluation.probe import ProbeSet, StrengthMetrics, light_metrics, measure_at_strength, metric_scalars
from tests.support.small_dit import SMALL, lora, small_dit

TEXTS = ["a cat", "sks, a dog", "", "a house"]


def _fake_context(texts: list[str]) -> torch.Tensor:
    """A deterministic context per text (its own seed), [P, 16, crossattn_dim]."""
    return torch.stack([torch.randn(16, SMALL.crossattn_dim, generator=torch.Generator().manual_seed(
        sum(map(ord, t)) + 7 * len(t))) for t in texts])


@pytest.fixture(scope="module")
def model():
    dit = small_dit()
    return dit, lora(dit)


def _probe(trigger: str | None = "sks") -> ProbeSet:
    return ProbeSet.encode(TEXTS, _fake_context, trigger=trigger, seeds=(3,), latent_size=(8, 8), batch_size=2)


def test_probe_pairs_the_prompts_without_the_trigger():
    probe = _probe()
    assert probe.texts_without == ["a cat", "", "a house"]
    assert probe.texts_with == ["sks, a cat", "sks", "sks, a house"]
    assert torch.equal(probe.contexts_with, _fake_context(probe.texts_with))
    plain = _probe(None)
    assert plain.texts_without == TEXTS and plain.contexts_with is None and not plain.has_trigger
    with pytest.raises(ValueError, match="every probe prompt mentions the trigger 'sks'"):
        ProbeSet.encode(["sks"], _fake_context, trigger="sks")


def test_measure_at_strength_is_the_drift_modules_numbers(model):
    dit, net = model
    probe = _probe()
    got = measure_at_strength(dit, net, probe, 0.8)
    kwargs = dict(seeds=(3,), latent_size=(8, 8), batch_size=2, strength=0.8)
    assert got.preservation_drift == preservation_drift(dit, net, probe.contexts_without, **kwargs)
    assert got.trigger_response == trigger_response(dit, net, probe.contexts_with, **kwargs)
    assert got.leak_score.overall == pytest.approx(got.preservation_drift.overall / got.trigger_response.overall)
    assert measure_at_strength(dit, net, probe, 0.8) == got  # deterministic
    no_trigger = measure_at_strength(dit, net, _probe(None), 1.0)
    assert no_trigger.trigger_response is None and no_trigger.leak_score is None
    assert StrengthMetrics.from_dict(json.loads(json.dumps(got.as_dict()))) == got


def test_light_metrics_and_their_scalars(model):
    dit, net = model
    gen = torch.Generator().manual_seed(0)
    batch = HeldoutBatch(torch.randn(2, 16, 1, 8, 8, generator=gen), torch.randn(2, 16, 1, 8, 8, generator=gen),
                         ["a cat", "a dog"], None)
    metrics = light_metrics(dit, net, _probe(), heldout=[batch], context_fn=_fake_context, device="cpu")
    assert list(metrics) == ["heldout_loss", "preservation_drift", "trigger_response", "leak_score"]
    assert metrics["heldout_loss"].samples == 2 and metrics["heldout_loss"].strength == 1.0
    scalars = metric_scalars(metrics)
    assert scalars["eval/leak_score"] == metrics["leak_score"].overall
    assert scalars["eval/preservation_drift_sigma_0.2"] == metrics["preservation_drift"].at(0.2)
    assert list(light_metrics(dit, net, _probe(), device="cpu")) == ["preservation_drift", "trigger_response",
                                                                      "leak_score"]
    with pytest.raises(ValueError, match="context_fn"):
        light_metrics(dit, net, _probe(), heldout=[batch], device="cpu")


def test_results_reload_equal(tmp_path, model):
    dit, net = model
    strengths = [measure_at_strength(dit, net, _probe(), s) for s in (0.5, 1.0)]
    results = EvalResults(
        command="anima-trainer eval --network a.safetensors", settings={"strengths": [0.5, 1.0], "trigger": "sks"},
        checkpoints=[CheckpointResult("a", "/x/a.safetensors", step=10, epoch=1, strengths=strengths,
                                      analysis={"total_energy": 1.5})],
        grids=[GridImage("grids/p00.png", "strengths", "a cat", ["a"], ["0.5", "1"], "a cat")], created="now")
    results.checkpoints[0].strengths[0] = StrengthMetrics(0.5, strengths[0].preservation_drift,
                                                          strengths[0].trigger_response,
                                                          strengths[0].leak_score.__class__(
                                                              "leak_score", (0.2,), (math.nan,), math.nan, 1, 0.5))
    path = results.save(tmp_path)
    assert path == tmp_path / "results.json"
    text = path.read_text()
    assert "NaN" not in text  # strict JSON: NaN written as null
    again = EvalResults.load(tmp_path)
    assert again.as_dict() == results.as_dict()
    assert again.checkpoints[0].at_strength(1.0) == strengths[1]
    assert math.isnan(again.checkpoints[0].at_strength(0.5).leak_score.overall)
    with pytest.raises(ValueError, match="results version 99"):
        EvalResults.from_dict({**results.as_dict(), "version": 99})
