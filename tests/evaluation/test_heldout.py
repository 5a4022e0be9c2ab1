"""Held-out flow loss per σ bucket (evaluation/heldout.py): the run's validation is this measurement, so the
two give the same numbers for the same data and settings; a strength measures the base or the network without
leaving the network changed."""

from __future__ import annotations

import pytest
import torch

from anima_trainer.data import ValidationSet, build_dataset, parse_dataset_config
from anima_trainer.demo import write_demo_models, write_shapes_dataset
from anima_trainer.evaluation import VALIDATION_SIGMAS, SigmaMetric, heldout_batches, heldout_loss
from anima_trainer.models import load_dit, load_text_encoder, load_vae
from anima_trainer.networks import create_network
from anima_trainer.train.inputs import TextConditioner
from anima_trainer.train.validation import Validator


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("heldout")
    models = write_demo_models(root / "models", seed=3)
    images = write_shapes_dataset(root / "images", count=6, seed=4)
    dit = load_dit(models["dit"], dtype=torch.float32)
    network = create_network(dit, algo="lora", dim=4, alpha=4.0, dropout=0.5)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in network.modules_by_name.values():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=gen) * 0.05)
    te = load_text_encoder(models["qwen3"], qwen3_tokenizer_path=models["tokenizers"], dtype=torch.float32)
    vae = load_vae(models["vae"], dtype=torch.float32)
    raw = {"general": {"resolution": 64, "batch_size": 2},
           "datasets": [{"subsets": [{"image_dir": str(images), "caption_extension": ".txt"}],
                         "validation_split": 0.5}]}
    validation = ValidationSet.from_dataset(build_dataset(parse_dataset_config(raw), seed=0))
    return {"dit": dit, "network": network, "vae": vae, "context": TextConditioner(dit, te).context,
            "validation": validation}


@pytest.mark.parametrize("settings", [{}, {"sigmas": (0.3, 0.7), "seed": 9, "loss_type": "huber", "huber_c": 0.2}])
def test_equals_the_runs_validation_loss(env, settings):
    """Same images, seeds, σ set and loss → the numbers validation logs, bit for bit."""
    env["network"].eval()
    validator = Validator.build(env["validation"], env["vae"].encode, **settings)
    logged = validator.run(env["dit"], env["context"], "cpu")
    batches = heldout_batches(env["validation"], env["vae"].encode)
    metric = heldout_loss(env["dit"], batches, env["context"], "cpu", **settings)
    assert metric.name == "heldout_loss" and metric.samples == 3 and metric.strength is None
    assert metric.sigmas == tuple(settings.get("sigmas", VALIDATION_SIGMAS))
    assert metric.scalars("val/loss") == logged
    assert list(logged) == ["val/loss", *(f"val/loss_sigma_{s:g}" for s in metric.sigmas)]
    assert metric.overall == sum(metric.per_sigma) / len(metric.per_sigma)
    for a, b in zip(batches, validator.batches, strict=True):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.noise, b.noise) and a.captions == b.captions
    assert SigmaMetric.from_dict(metric.as_dict()) == metric


def test_strength_measures_base_and_network_and_restores_them(env):
    dit, network = env["dit"], env["network"]
    batches = heldout_batches(env["validation"], env["vae"].encode, max_batches=1)
    assert len(batches) == 1 and len(batches[0].captions) == 2
    network.train()  # dropout 0.5: the measurement must switch it off itself
    state = torch.get_rng_state()
    try:
        adapted = heldout_loss(dit, batches, env["context"], "cpu", network=network, strength=1.0)
        base = heldout_loss(dit, batches, env["context"], "cpu", network=network, strength=0.0)
        assert network.training and all(m.multiplier == 1.0 for m in network.lora_modules)
        assert torch.equal(torch.get_rng_state(), state)
        assert (adapted.strength, base.strength) == (1.0, 0.0)
        assert all(a != b for a, b in zip(adapted.per_sigma, base.per_sigma, strict=True))
        network.remove()  # the bare DiT: strength 0 is the base, exactly
        try:
            bare = heldout_loss(dit, batches, env["context"], "cpu")
        finally:
            network.inject()
        assert bare.per_sigma == base.per_sigma
        network.eval()
        assert heldout_loss(dit, batches, env["context"], "cpu").per_sigma == adapted.per_sigma
    finally:
        network.eval()
    with pytest.raises(ValueError, match="at least one batch"):
        heldout_loss(dit, [], env["context"], "cpu")
