"""Flow maths: σ sampling methods, noising, target, loss types and weighting, masked loss and sample weights.

LR schedules are tested in test_schedulers.py, save names in test_save_plan.py."""

from __future__ import annotations

import math

import pytest
import torch

from anima_trainer.train.flow import flow_loss, noisy_input, sample_sigmas, shift_sigma


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


def test_masked_loss_and_sample_weights():
    pred, target = torch.zeros(2, 1, 1, 2, 2), torch.ones(2, 1, 1, 2, 2)
    sigma = torch.tensor([0.5, 0.5])
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 1, 2, 2).expand(2, 1, 1, 2, 2)
    assert flow_loss(pred, target, sigma, mask=mask).item() == pytest.approx(0.25)  # kohya: mean of loss·mask
    w = torch.tensor([1.0, 3.0])
    assert flow_loss(pred, target, sigma, sample_weights=w).item() == pytest.approx((1 + 3) / 2)
