"""Differential output preservation (issue 17): the term's maths, its place in the step's loss and logs, exact
resume with it on, weight 0 = off, and its option checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import anima_trainer.train.loop as loop
from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.config.flow_settings import FlowSettings
from anima_trainer.demo import write_demo_configs, write_demo_dataset_toml
from anima_trainer.evaluation.prompt_bank import BUILTIN_PROMPTS
from anima_trainer.models import load_dit
from anima_trainer.networks import create_network
from anima_trainer.sample.prompts import PromptFileError
from anima_trainer.train.flow import Preservation, preservation_term, training_step
from anima_trainer.train.loop import run_training
from tests.support.killed_run import killed_after


def _config(setup: dict, out: Path, *extra: str, steps: int = 3):
    toml = write_demo_configs(out, setup["models"], setup["images"], steps, seed=5)
    write_demo_dataset_toml(out / "dataset.toml", setup["images"], batch_size=2, num_repeats=1)
    return parse_train_args(["--config_file", str(toml), "--learning_rate", "1e-2", "--save_every_n_steps", "1",
                             "--save_state", "--log_every_n_steps", "1", *extra])


def _same(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _trained_network(setup: dict):
    dit = load_dit(setup["models"]["dit"], dtype=torch.float32)
    network = create_network(dit, algo="lora", dim=4, alpha=4)
    with torch.no_grad():  # a network that changes the output (a fresh LoRA's up weights are 0)
        g = torch.Generator().manual_seed(0)
        for p in network.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return dit, network


def test_the_term_is_the_squared_difference_to_the_network_at_multiplier_0(setup):
    dit, network = _trained_network(setup)
    network.train()
    x = torch.randn(2, 16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(2, 512, 64, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.3, 0.7])
    term = preservation_term(dit, network, x, sigma, ctx)
    with torch.no_grad():
        adapted = dit(x, sigma, ctx)
        network.set_multiplier(0.0)
        base = dit(x, sigma, ctx)
        network.set_multiplier(1.0)
    assert term.dtype == torch.float32 and term.item() > 0
    assert torch.equal(term.detach(), F.mse_loss(adapted.float(), base.float()))
    assert network.training  # the mode and multiplier are put back
    assert torch.equal(dit(x, sigma, ctx).detach(), adapted)
    term.backward()  # the gradient reaches the network (through the adapted forward; the base one is no_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.trainable_parameters())


def test_training_step_adds_weight_times_the_term_at_the_steps_own_noisy_input(setup):
    dit, network = _trained_network(setup)
    flow_cfg = FlowSettings()  # the objective's defaults (noise options off)
    latents = torch.randn(2, 16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ctx = torch.randn(2, 512, 64, generator=torch.Generator().manual_seed(4))
    contexts = torch.randn(5, 512, 64, generator=torch.Generator().manual_seed(5))
    pres = Preservation(dit, network, contexts, weight=0.5, every_n_steps=2, seed=7)
    assert pres.for_step(3, 0) is None and pres.for_step(4, 0) is not None
    picked = pres.pick(4, 0, 2)
    assert torch.equal(picked, pres.pick(4, 0, 2)) and len(set(picked.tolist())) == 2
    assert len(pres.pick(4, 0, 12)) == 12 and not torch.equal(pres.pick(4, 0, 5), pres.pick(6, 0, 5))
    seen: dict[str, torch.Tensor] = {}

    def capture(x_t, sigma):
        seen["x_t"], seen["sigma"] = x_t, sigma
        return torch.zeros(())
    with torch.no_grad():
        flow = training_step(dit, latents, ctx, flow_cfg, [11, 12])
        assert torch.equal(training_step(dit, latents, ctx, flow_cfg, [11, 12], extra_loss=capture), flow)
        recorded = []
        total = training_step(dit, latents, ctx, flow_cfg, [11, 12], extra_loss=pres.for_step(4, 0, recorded.append))
        direct = preservation_term(dit, network, seen["x_t"], seen["sigma"], contexts[picked])
    assert torch.equal(recorded[0], direct) and direct.item() > 0
    torch.testing.assert_close(total, flow + 0.5 * direct, rtol=0, atol=1e-7)


def test_weight_0_is_bit_identical_to_unset(setup, tmp_path):
    off = run_training(_config(setup, tmp_path / "off", steps=2))
    zero = run_training(_config(setup, tmp_path / "zero", "--preservation_loss_weight", "0", steps=2))
    assert _same(off.final_path, zero.final_path) and off.losses == zero.losses


def test_logged_total_is_flow_plus_weighted_term_and_the_term_is_logged(setup, tmp_path, monkeypatch):
    real = loop.training_step
    checks: list[tuple[float, float, float]] = []

    def step(dit, latents, context, cfg, seeds, mask=None, sample_weights=None, extra_loss=None):
        with torch.no_grad():  # the flow loss alone (no dropout in this run: the same forward again)
            flow = real(dit, latents, context, cfg, seeds, mask=mask, sample_weights=sample_weights)
        terms: list[torch.Tensor] = []

        def recording(x_t, sigma):
            weighted = extra_loss(x_t, sigma)
            terms.append(weighted.detach())
            return weighted
        total = real(dit, latents, context, cfg, seeds, mask=mask, sample_weights=sample_weights,
                     extra_loss=None if extra_loss is None else recording)
        checks.append((total.item(), flow.item(), terms[0].item() if terms else 0.0))
        return total

    monkeypatch.setattr(loop, "training_step", step)
    logged: list[dict] = []
    real_end = loop.Monitor.end_step

    def end_step(self, *args, **kwargs):
        logs = real_end(self, *args, **kwargs)
        if logs:
            logged.append(logs)
        return logs
    monkeypatch.setattr(loop.Monitor, "end_step", end_step)
    run = run_training(_config(setup, tmp_path / "on", "--preservation_loss_weight", "2.0",
                               "--preservation_every_n_steps", "2", steps=4))
    assert len(checks) == 4
    for i, (total, flow, weighted) in enumerate(checks, start=1):
        assert (weighted > 0) == (i % 2 == 0)  # steps 2 and 4 carry the term
        assert total == pytest.approx(flow + weighted, rel=1e-6, abs=1e-9)
        assert run.losses[i - 1] == pytest.approx(total, rel=1e-6)
    assert [("loss/preservation" in logs) for logs in logged] == [False, True, False, True]
    assert logged[1]["loss/preservation"] == pytest.approx(checks[1][2] / 2.0, rel=1e-6)


@pytest.mark.parametrize("cache", [False, True], ids=["images", "cached"])
def test_interrupted_and_resumed_run_with_preservation_is_bit_identical(setup, tmp_path, monkeypatch, cache):
    extra = ("--preservation_loss_weight", "1.0", "--network_dropout", "0.1",
             *(("--cache_latents", "--cache_text_encoder_outputs") if cache else ()))
    reference = run_training(_config(setup, tmp_path / "ref", *extra))
    with killed_after(monkeypatch, 2, RuntimeError):
        run_training(_config(setup, tmp_path / "cut", *extra))
    resumed = run_training(_config(setup, tmp_path / "cut", *extra, "--resume", "latest"))
    assert resumed.steps == reference.steps == 3
    assert _same(reference.final_path, resumed.final_path)
    plain = run_training(_config(setup, tmp_path / "plain", *extra[2:], "--preservation_loss_weight", "0"))
    assert not _same(reference.final_path, plain.final_path)  # the term changed the training


@pytest.mark.parametrize(("line", "message"), [
    ("preservation_loss_weight = -1.0", "preservation_loss_weight: "),
    ("preservation_every_n_steps = 0", "preservation_every_n_steps: "),
])
def test_bad_values_are_config_errors_with_file_and_line(setup, tmp_path, line, message):
    toml = write_demo_configs(tmp_path, setup["models"], setup["images"], 2, seed=5)
    toml.write_text(toml.read_text(encoding="utf-8") + line + "\n", encoding="utf-8")
    lineno = len(toml.read_text(encoding="utf-8").splitlines())
    with pytest.raises(ConfigError) as info:
        parse_train_args(["--config_file", str(toml)])
    assert message in str(info.value) and f"(in {toml.name} line {lineno})" in str(info.value)


def test_a_trained_text_encoder_is_refused_with_the_fix(setup, tmp_path):
    toml = write_demo_configs(tmp_path, setup["models"], setup["images"], 2, seed=5)
    text = toml.read_text(encoding="utf-8").replace("network_train_unet_only = true", "network_train_unet_only = false")
    toml.write_text(text + "preservation_loss_weight = 1.0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"preservation_loss_weight = 1\.0: .*trains the text encoder .*set "
                                          r"network_train_unet_only = true"):
        parse_train_args(["--config_file", str(toml)])


def test_a_bad_preservation_prompt_file_is_refused_before_any_model_loads(setup, tmp_path, monkeypatch):
    prompts = tmp_path / "keep.txt"
    prompts.write_text("1girl, solo --x 3\n", encoding="utf-8")
    monkeypatch.setattr(loop, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(PromptFileError, match=r"keep\.txt.*line 1: option --x is not known"):
        run_training(_config(setup, tmp_path / "bad", "--preservation_loss_weight", "1.0",
                             "--preservation_prompts", str(prompts), steps=1))


def test_the_prompt_file_replaces_the_builtin_bank(setup, tmp_path, monkeypatch):
    prompts = tmp_path / "keep.txt"
    prompts.write_text("1girl, solo, smile --s 20\n\nscenery, mountains\n", encoding="utf-8")
    built: list[Preservation] = []
    real = loop.build_preservation

    def build(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]
    monkeypatch.setattr(loop, "build_preservation", build)
    run_training(_config(setup, tmp_path / "file", "--preservation_loss_weight", "1.0",
                         "--preservation_prompts", str(prompts), steps=1))
    run_training(_config(setup, tmp_path / "bank", "--preservation_loss_weight", "1.0", steps=1))
    assert [len(p.contexts) for p in built] == [2, len(BUILTIN_PROMPTS)]
