"""Flow maths: σ sampling methods, noising, target, loss types and weighting, schedules, save names."""

from __future__ import annotations

import math

import pytest
import torch

from anima_trainer.train.flow import flow_loss, noisy_input, sample_sigmas, shift_sigma
from anima_trainer.train.optim import build_optimizer, build_scheduler, resolve_warmup
from anima_trainer.train.state import SavePlan


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_sigmoid_sampling_is_logit_normal_in_fp32():
    s = sample_sigmas(20000, method="sigmoid", sigmoid_scale=1.0, generator=_gen())
    assert s.dtype == torch.float32 and 0 < s.min() and s.max() < 1
    logit = torch.log(s / (1 - s))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1.0) < 0.03
    wide = sample_sigmas(20000, method="sigmoid", sigmoid_scale=2.0, generator=_gen())
    assert abs(torch.log(wide / (1 - wide)).std().item() - 2.0) < 0.05


def test_shift_and_flux_shift():
    base = sample_sigmas(1000, method="sigmoid", generator=_gen(1))
    shifted = sample_sigmas(1000, method="shift", shift=3.0, generator=_gen(1))
    torch.testing.assert_close(shifted, 3 * base / (1 + 2 * base))
    assert shift_sigma(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    flux = sample_sigmas(1000, method="flux_shift", patches=4096, generator=_gen(1))
    mu = math.exp(1.15)  # 4096 patches (1024² px): μ = 1.15, about shift 3.16
    torch.testing.assert_close(flux, mu / (mu + (1 / base - 1)))
    low = sample_sigmas(1000, method="flux_shift", patches=256, generator=_gen(1))
    torch.testing.assert_close(low, math.exp(0.5) / (math.exp(0.5) + (1 / base - 1)))


def test_uniform_and_sigma_methods():
    u = sample_sigmas(20000, method="uniform", generator=_gen())
    assert abs(u.mean().item() - 0.5) < 0.01
    s = sample_sigmas(5000, method="sigma", shift=1.0, weighting_scheme="uniform", generator=_gen())
    assert s.max() <= 1.0 and s.min() >= 1e-3 and abs(s.mean().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="timestep_sampling"):
        sample_sigmas(2, method="logit")


def test_noising_and_velocity_target():
    x0, noise = torch.randn(2, 16, 1, 4, 4), torch.randn(2, 16, 1, 4, 4)
    sigma = torch.tensor([0.0, 1.0])
    xt = noisy_input(x0, noise, sigma)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], noise[1])
    sigma = torch.tensor([0.3, 0.8])
    xt = noisy_input(x0, noise, sigma)
    v = noise - x0  # a perfect prediction recovers x0 exactly as ComfyUI's denoised = x − σ·v
    torch.testing.assert_close(xt - sigma.view(-1, 1, 1, 1, 1) * v, x0)


def test_loss_types_and_weighting():
    pred, target = torch.zeros(2, 3, 1, 2, 2), torch.ones(2, 3, 1, 2, 2)
    target[1] *= 2
    sigma = torch.tensor([0.5, 0.25])
    assert flow_loss(pred, target, sigma).item() == pytest.approx((1 + 4) / 2)
    assert flow_loss(pred, target, sigma, loss_type="l1").item() == pytest.approx(1.5)
    c = 0.1
    huber = [2 * c * (math.sqrt(d * d + c * c) - c) for d in (1, 2)]
    assert flow_loss(pred, target, sigma, loss_type="huber", huber_c=c).item() == pytest.approx(sum(huber) / 2)
    w = flow_loss(pred, target, sigma, weighting_scheme="sigma_sqrt").item()
    assert w == pytest.approx((1 * 0.5 ** -2 + 4 * 0.25 ** -2) / 2)
    with pytest.raises(ValueError, match="loss_type"):
        flow_loss(pred, target, sigma, loss_type="mse")


def test_schedules_and_warmup():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([p], 1.0, {"weight_decay": "0.0", "betas": "(0.9, 0.99)"})
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["weight_decay"] == 0.0
    sched = build_scheduler(opt, "cosine", max_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # kohya's (transformers') warm-up starts at 0: i / W, then the cosine from step W
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.5)
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert resolve_warmup(0.1, 200) == 20 and resolve_warmup(5, 200) == 5 and resolve_warmup(None, 9) == 0
    with pytest.raises(ValueError, match="lr_scheduler"):
        build_scheduler(opt, "cosine_with_restarts_typo", 10)


def test_save_plan_names_retention_and_refusal(tmp_path):
    plan = SavePlan(tmp_path, "mylora", every_n_steps=10, keep_last_n_steps=20)
    assert plan.step_path(10).name == "mylora-step00000010.safetensors"
    assert plan.epoch_path(3).name == "mylora-000003.safetensors"
    stranger = tmp_path / "mylora-step00000001.safetensors"
    stranger.write_bytes(b"user file")
    for step in (10, 20, 30, 40):
        plan.step_path(step).write_bytes(b"x")
        removed = plan.record_step(step, plan.step_path(step))
    assert [p.name for p in removed] == ["mylora-step00000020.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mylora-step00000001.safetensors",
                                                         "mylora-step00000030.safetensors",
                                                         "mylora-step00000040.safetensors"]
    plan.final_path.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="already exists"):
        plan.check_start()
    SavePlan(tmp_path, "mylora", overwrite=True).check_start()


def test_masked_loss_and_sample_weights():
    pred, target = torch.zeros(2, 1, 1, 2, 2), torch.ones(2, 1, 1, 2, 2)
    sigma = torch.tensor([0.5, 0.5])
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 1, 2, 2).expand(2, 1, 1, 2, 2)
    assert flow_loss(pred, target, sigma, mask=mask).item() == pytest.approx(0.25)  # kohya: mean of loss·mask
    w = torch.tensor([1.0, 3.0])
    assert flow_loss(pred, target, sigma, sample_weights=w).item() == pytest.approx((1 + 3) / 2)
