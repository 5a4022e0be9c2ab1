"""Validation loss (train/validation.py) on the tiny models: fixed σ and noise give repeatable numbers that
move with the network, the training RNG streams are untouched, and the settings are checked."""

from __future__ import annotations

import pytest
import torch

from anima_trainer.config import ConfigError, make_train_config, parse_train_args
from anima_trainer.data import ValidationSet, build_dataset, parse_dataset_config
from anima_trainer.demo import write_shapes_dataset
from anima_trainer.models import load_dit, load_text_encoder, load_vae
from anima_trainer.networks import create_network
from anima_trainer.train.flow import sample_seed, training_step
from anima_trainer.train.loop import TextConditioner
from anima_trainer.train.validation import (
    VALIDATION_SIGMAS,
    Validator,
    build_validator,
    check_validation,
    sigma_key,
)

REQUIRED = {"pretrained_model_name_or_path": "dit.safetensors", "qwen3": "q.safetensors", "vae": "v.safetensors",
            "output_dir": "out", "dataset_config": "dataset.toml"}


def _cfg(**kw):
    return make_train_config({**REQUIRED, **kw})


@pytest.fixture(scope="module")
def env(setup) -> dict:
    models = setup["models"]
    images = write_shapes_dataset(setup["root"] / "val_images", count=8, seed=4)
    dit = load_dit(models["dit"], dtype=torch.float32)
    network = create_network(dit, algo="lora", dim=4, alpha=4.0, dropout=0.5, rank_dropout="0.5")
    te = load_text_encoder(models["qwen3"], qwen3_tokenizer_path=models["tokenizers"], dtype=torch.float32)
    vae = load_vae(models["vae"], dtype=torch.float32)
    return {"images": images, "dit": dit, "network": network, "te": te, "vae": vae,
            "conditioner": TextConditioner(dit, te)}


def _dataset(env, split: float | None = 0.5, batch_size: int = 2, seed: int = 0, **kw):
    ds = {"subsets": [{"image_dir": str(env["images"]), "caption_extension": ".txt"}]}
    if split is not None:
        ds["validation_split"] = split
    raw = {"general": {"resolution": 64, "batch_size": batch_size}, "datasets": [ds]}
    return build_dataset(parse_dataset_config(raw), seed=seed, **kw)


def _randomize_up(network, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.modules_by_name.values():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=gen) * 0.05)


def test_loss_is_repeatable_per_band_and_moves_with_the_network(env):
    ds = _dataset(env)
    validator = Validator.build(ValidationSet.from_dataset(ds), env["vae"].encode, seed=3)
    assert validator.num_items == 4 and len(validator.batches) == 2
    env["network"].eval()
    _randomize_up(env["network"], 0)
    first = validator.run(env["dit"], env["conditioner"].context, "cpu")
    assert list(first) == ["val/loss", *(sigma_key(s) for s in VALIDATION_SIGMAS)]
    assert list(first)[1:] == ["val/loss_sigma_0.2", "val/loss_sigma_0.4", "val/loss_sigma_0.6", "val/loss_sigma_0.8"]
    assert first["val/loss"] == pytest.approx(sum(first[sigma_key(s)] for s in VALIDATION_SIGMAS) / 4)
    assert all(v > 0 for v in first.values()) and len({first[sigma_key(s)] for s in VALIDATION_SIGMAS}) == 4
    assert validator.run(env["dit"], env["conditioner"].context, "cpu") == first  # bit-identical
    # a validator built again from the same data and seeds gives the same numbers
    rebuilt = Validator.build(ValidationSet.from_dataset(_dataset(env)), env["vae"].encode, seed=3)
    assert rebuilt.run(env["dit"], env["conditioner"].context, "cpu") == first
    _randomize_up(env["network"], 1)
    changed = validator.run(env["dit"], env["conditioner"].context, "cpu")
    assert all(changed[k] != first[k] for k in first)
    # another validation seed → other noise → other numbers for the same images and weights
    reseeded = ValidationSet(ds.params, ds.validation_items, seed=5)
    assert [i.path for i in reseeded.items] == [i.path for i in ValidationSet.from_dataset(ds).items]
    other = Validator.build(reseeded, env["vae"].encode).run(env["dit"], env["conditioner"].context, "cpu")
    assert all(other[k] != changed[k] for k in first)


def test_losses_match_a_direct_computation(env):
    """`run` is the plain flow loss at the fixed σ and noise (no weighting, no shift)."""
    from anima_trainer.train.flow import flow_loss, noisy_input

    env["network"].eval()
    _randomize_up(env["network"], 2)
    v = ValidationSet.from_dataset(_dataset(env))
    validator = Validator.build(v, env["vae"].encode, sigmas=(0.3, 0.7))
    got = validator.run(env["dit"], env["conditioner"].context, "cpu")
    expected, n = {0.3: 0.0, 0.7: 0.0}, 0
    with torch.no_grad():
        for indices in v.batches():
            x0 = env["vae"].encode(v.load_batch(indices).images)
            noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(v.noise_seed(i)))
                                 for i in indices])
            ctx = env["conditioner"].context([v.captions[i] for i in indices])
            for s in expected:
                sig = torch.full((len(indices),), s)
                expected[s] += flow_loss(env["dit"](noisy_input(x0, noise, sig), sig, ctx), noise - x0, sig).item() \
                    * len(indices)
            n += len(indices)
    assert got["val/loss_sigma_0.3"] == pytest.approx(expected[0.3] / n, rel=1e-5)
    assert got["val/loss_sigma_0.7"] == pytest.approx(expected[0.7] / n, rel=1e-5)


def test_max_validation_steps_caps_batches_without_changing_them(env):
    ds = _dataset(env, batch_size=1)
    full = Validator.build(ValidationSet.from_dataset(ds), env["vae"].encode)
    capped = Validator.build(ValidationSet.from_dataset(ds), env["vae"].encode, max_batches=2)
    assert len(full.batches) == 4 and len(capped.batches) == 2
    for a, b in zip(capped.batches, full.batches):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.noise, b.noise) and a.captions == b.captions
    cfg = _cfg(max_validation_steps=3, validate_every_n_steps=10)
    validator = build_validator(cfg, ds, env["vae"].encode, "cpu", seed=0)
    assert len(validator.batches) == 3
    assert [validator.due_at_step(s) for s in (0, 5, 10, 20)] == [False, False, True, True]
    assert all(validator.due_at_epoch(e) for e in (1, 2, 3))  # kohya: every epoch when unset
    every2 = build_validator(_cfg(validate_every_n_epochs=2), ds, env["vae"].encode, "cpu", seed=0)
    assert [every2.due_at_epoch(e) for e in (1, 2, 3, 4)] == [False, True, False, True]
    assert not every2.due_at_step(10)


def test_training_rng_streams_are_untouched(env):
    """The global torch RNG and the loop's generator are the same after a run, even with the network left in
    train mode (LoRA dropout draws from the global RNG): the validator forks and reseeds it."""
    _randomize_up(env["network"], 3)
    validator = Validator.build(ValidationSet.from_dataset(_dataset(env)), env["vae"].encode, seed=1)
    generator = torch.Generator().manual_seed(123)
    torch.manual_seed(77)
    torch.rand(3)
    global_before, gen_before = torch.get_rng_state(), generator.get_state()
    env["network"].train()
    try:
        a = validator.run(env["dit"], env["conditioner"].context, "cpu")
        assert torch.equal(torch.get_rng_state(), global_before)
        b = validator.run(env["dit"], env["conditioner"].context, "cpu")
    finally:
        env["network"].eval()
    assert a == b  # reseeded inside: even the dropout draws repeat
    assert torch.equal(torch.get_rng_state(), global_before) and torch.equal(generator.get_state(), gen_before)


def test_validation_between_steps_does_not_change_training(env):
    """Two short trainings, one with a validation run after every step: identical losses and weights."""
    cfg = _cfg(learning_rate=1e-2)
    ds = _dataset(env)
    validator = Validator.build(ValidationSet.from_dataset(ds), env["vae"].encode)
    batch = ds.load_batch(ds.batch_plan(0)[0], epoch=0)
    latents = env["vae"].encode(batch.images)

    _randomize_up(env["network"], 4)
    params = env["network"].trainable_parameters()
    start = [p.detach().clone() for p in params]

    def train(validate: bool) -> tuple[list[float], torch.Tensor]:
        with torch.no_grad():
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
        opt = torch.optim.SGD(params, lr=cfg.learning_rate)
        torch.manual_seed(9)
        losses = []
        for step in range(3):
            env["network"].train()
            seeds = [sample_seed(9, step, i, 0) for i in range(latents.shape[0])]
            loss = training_step(env["dit"], latents, env["conditioner"].context(batch.captions), cfg, seeds)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            if validate:
                env["network"].eval()
                validator.run(env["dit"], env["conditioner"].context, "cpu")
        env["network"].eval()
        return losses, torch.cat([p.detach().flatten().clone() for p in params])

    plain, with_val = train(False), train(True)
    assert plain[0] == with_val[0] and torch.equal(plain[1], with_val[1])


def test_settings_and_config_errors(env, tmp_path):
    ds = _dataset(env, split=None)
    for key in ("validate_every_n_steps", "validate_every_n_epochs"):
        with pytest.raises(ConfigError, match=f"{key}: no validation images; set validation_split"):
            check_validation(_cfg(**{key: 5}), ds)
        with pytest.raises(ConfigError, match="validation_split"):
            build_validator(_cfg(**{key: 5}), ds, env["vae"].encode, "cpu", seed=0)
    assert check_validation(_cfg(max_validation_steps=3), ds) is False
    assert build_validator(_cfg(), ds, env["vae"].encode, "cpu", seed=0) is None
    # the train-arg validation_split is the default of datasets that set none
    cfg = _cfg(validation_split=0.25, validation_seed=4, validate_every_n_steps=2)
    held = _dataset(env, split=None, default_validation_split=cfg.validation_split,
                    default_validation_seed=cfg.validation_seed)
    assert len(held.validation_items) == 2 and check_validation(cfg, held)
    assert build_validator(cfg, held, env["vae"].encode, "cpu", seed=0).seed == 4
    # kohya names on the command line and in a TOML; types and ranges checked with the key named
    base = [f"--{k}={v}" for k, v in REQUIRED.items()]
    c = parse_train_args([*base, "--validation_split", "0.1", "--validation_seed", "3", "--validate_every_n_steps",
                          "50", "--validate_every_n_epochs", "2", "--max_validation_steps", "4"])
    assert (c.validation_split, c.validation_seed, c.validate_every_n_steps, c.validate_every_n_epochs,
            c.max_validation_steps) == (0.1, 3, 50, 2, 4)
    meta = c.to_metadata(optimizer="(not read here)")
    assert (meta["ss_validation_split"], meta["ss_validation_seed"], meta["ss_validate_every_n_steps"]) == \
        ("0.1", "3", "50")
    toml = tmp_path / "t.toml"
    toml.write_text('validation_seed = ""\nvalidate_every_n_steps = ""\nvalidation_split = 0.0\n', encoding="utf-8")
    c = parse_train_args([*base, "--config_file", str(toml)])
    assert (c.validation_seed, c.validate_every_n_steps, c.validation_split) == (None, None, 0.0)
    for argv, message in ((["--validation_split", "1"], "validation_split: must be < 1"),
                          (["--validation_split", "-0.1"], "validation_split: must be >= 0"),
                          (["--validate_every_n_steps", "0"], "validate_every_n_steps: must be >= 1"),
                          (["--max_validation_steps", "x"], "max_validation_steps: expected an integer")):
        with pytest.raises(ConfigError) as e:
            parse_train_args([*base, *argv])
        assert message in str(e.value)
