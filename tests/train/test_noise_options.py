"""kohya's noise and timestep options (issue 14): each against a hand-computed expectation, drawn from the
generator of the sample being noised (so a sample's noise stays a function of its seed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from anima_trainer.config import ConfigError, parse_train_args
from anima_trainer.train.flow import (
    NoiseOptions,
    draw_noise_and_sigma,
    objective_notices,
    sample_sigmas,
)
from anima_trainer.train.loop import training_step

SHAPE = (4, 1, 6, 8)  # C, T, H, W
SIGMA = {"method": "sigmoid"}


def _gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _base(g: torch.Generator, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws every run makes first, in order: ε then σ."""
    return torch.randn((n, *SHAPE), generator=g), sample_sigmas(n, method="sigmoid", generator=g)


def test_with_every_option_off_the_draws_are_those_of_earlier_runs():
    noise, sigma, noise_in = draw_noise_and_sigma(2, SHAPE, _gen(), NoiseOptions(), **SIGMA)
    base, s = _base(_gen())
    assert torch.equal(noise, base) and torch.equal(sigma, s) and noise_in is noise
    # kohya's "off" values (0 / None) are off too
    zero = NoiseOptions(noise_offset=0.0, multires_noise_iterations=0, ip_noise_gamma=0.0)
    assert torch.equal(draw_noise_and_sigma(2, SHAPE, _gen(), zero, **SIGMA)[0], base)


def test_noise_offset_adds_one_normal_per_sample_and_channel():
    noise, sigma, noise_in = draw_noise_and_sigma(2, SHAPE, _gen(), NoiseOptions(noise_offset=0.1), **SIGMA)
    g = _gen()
    base, s = _base(g)
    z = torch.randn((2, 4, 1, 1, 1), generator=g)
    assert torch.equal(sigma, s)
    torch.testing.assert_close(noise, base + 0.1 * z, rtol=0, atol=0)
    assert noise_in is noise  # the offset is part of ε, hence of the target ε − x0
    # constant over T, H, W: the offset is exactly the difference to the plain noise
    diff = noise - base
    torch.testing.assert_close(diff, diff[..., :1, :1, :1].expand_as(diff), rtol=0, atol=1e-6)


def test_noise_offset_random_strength_draws_u_then_z():
    opts = NoiseOptions(noise_offset=0.2, noise_offset_random_strength=True)
    noise = draw_noise_and_sigma(3, SHAPE, _gen(), opts, **SIGMA)[0]
    g = _gen()
    base, _ = _base(g, 3)
    u = torch.rand(3, 1, generator=g)
    z = torch.randn((3, 4, 1, 1, 1), generator=g)
    torch.testing.assert_close(noise, base + (u * 0.2).view(3, 1, 1, 1, 1) * z, rtol=0, atol=0)
    assert 0 < float(u.min()) and float(u.max()) < 1


def test_adaptive_noise_scale_adds_the_channel_mean_and_clamps_at_zero():
    x0 = torch.zeros(2, *SHAPE)
    x0[:, 1] = -2.0  # |mean| = 2 in channel 1, 0 elsewhere
    x0[1, 3] = 0.5
    opts = NoiseOptions(noise_offset=0.1, adaptive_noise_scale=0.05)
    noise = draw_noise_and_sigma(2, SHAPE, _gen(), opts, x0=x0, **SIGMA)[0]
    g = _gen()
    base, _ = _base(g)
    z = torch.randn((2, 4, 1, 1, 1), generator=g)
    o = torch.full((2, 4), 0.1)
    o[:, 1] += 0.05 * 2.0
    o[1, 3] += 0.05 * 0.5
    torch.testing.assert_close(noise, base + o.view(2, 4, 1, 1, 1) * z, rtol=1e-6, atol=1e-6)
    # a negative scale that outweighs the offset gives offset 0 (kohya's clamp), not a negative one
    neg = draw_noise_and_sigma(2, SHAPE, _gen(), NoiseOptions(noise_offset=0.1, adaptive_noise_scale=-1.0),
                               x0=x0, **SIGMA)[0]
    assert torch.equal(neg[:, 1], base[:, 1])  # channel 1: 0.1 − 2 → 0
    torch.testing.assert_close(neg[:, 0], base[:, 0] + 0.1 * z[:, 0], rtol=0, atol=0)


def _hand_pyramid(noise: torch.Tensor, g: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """kohya's pyramid_noise_like written out for [n, C, 1, H, W], per-sample std, levels from `g`."""
    n, c, _, h, w = noise.shape
    out = noise[:, :, 0].clone()
    for i in range(iterations):
        r = torch.rand((), generator=g).item() * 2 + 2
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        level = torch.randn((n, c, hn, wn), generator=g)
        out = out + F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False) * discount ** i
        if hn == 1 or wn == 1:
            break
    out = torch.stack([out[k] / out[k].std() for k in range(n)])
    return out.unsqueeze(2)


@pytest.mark.parametrize("iterations", [3, 10])  # 10 stops early, at the first level with a side of 1
def test_multires_noise_matches_a_hand_written_pyramid(iterations):
    opts = NoiseOptions(multires_noise_iterations=iterations, multires_noise_discount=0.5)
    noise = draw_noise_and_sigma(2, SHAPE, _gen(), opts, **SIGMA)[0]
    g = _gen()
    base, _ = _base(g)
    expected = _hand_pyramid(base, g, iterations, 0.5)
    torch.testing.assert_close(noise, expected, rtol=1e-5, atol=1e-6)
    for k in range(2):  # each sample rescaled to unit std on its own
        assert float(noise[k].std()) == pytest.approx(1.0, abs=1e-5)
    # the generator is exactly where the hand-written loop left it: no extra level was drawn after the 1-side
    assert torch.equal(torch.rand(1, generator=g), torch.rand(1, generator=_after(opts)))


def _after(opts: NoiseOptions) -> torch.Generator:
    g = _gen()
    draw_noise_and_sigma(2, SHAPE, g, opts, **SIGMA)
    return g


def test_ip_noise_gamma_perturbs_the_input_noise_only():
    noise, sigma, noise_in = draw_noise_and_sigma(2, SHAPE, _gen(), NoiseOptions(ip_noise_gamma=0.1), **SIGMA)
    g = _gen()
    base, s = _base(g)
    xi = torch.randn((2, *SHAPE), generator=g)
    assert torch.equal(noise, base) and torch.equal(sigma, s)
    torch.testing.assert_close(noise_in, base + 0.1 * xi, rtol=0, atol=0)
    # random strength: γ = U(0,1)·ip_noise_gamma per sample, drawn before ξ
    opts = NoiseOptions(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
    noise, _, noise_in = draw_noise_and_sigma(2, SHAPE, _gen(), opts, **SIGMA)
    g = _gen()
    base, _ = _base(g)
    u = torch.rand(2, generator=g)
    xi = torch.randn((2, *SHAPE), generator=g)
    assert torch.equal(noise, base)
    torch.testing.assert_close(noise_in, base + (0.1 * u).view(2, 1, 1, 1, 1) * xi, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["sigmoid", "uniform", "shift", "sigma"])
def test_min_max_timestep_map_sigma_onto_the_range(method):
    opts = NoiseOptions(min_timestep=200, max_timestep=400)
    kw = {"method": method, "shift": 3.0}
    sigma = draw_noise_and_sigma(4000, (1, 1, 2, 2), _gen(), opts, **kw)[1]
    g = _gen()
    torch.randn((4000, 1, 1, 2, 2), generator=g)
    free = sample_sigmas(4000, generator=g, **kw)
    torch.testing.assert_close(sigma, free * 0.2 + 0.2, rtol=0, atol=1e-7)
    assert 0.2 <= float(sigma.min()) and float(sigma.max()) <= 0.4
    # min only / max only: the other end is kohya's default (0 / 1000); min = max fixes σ
    lo = draw_noise_and_sigma(500, (1, 1, 2, 2), _gen(), NoiseOptions(min_timestep=900), **kw)[1]
    assert float(lo.min()) >= 0.9
    hi = draw_noise_and_sigma(500, (1, 1, 2, 2), _gen(), NoiseOptions(max_timestep=100), **kw)[1]
    assert float(hi.max()) <= 0.1
    fixed = draw_noise_and_sigma(5, (1, 1, 2, 2), _gen(), NoiseOptions(min_timestep=500, max_timestep=500), **kw)[1]
    assert torch.equal(fixed, torch.full((5,), 0.5))
    full = draw_noise_and_sigma(50, (1, 1, 2, 2), _gen(), NoiseOptions(min_timestep=0, max_timestep=1000), **kw)[1]
    assert torch.equal(full, draw_noise_and_sigma(50, (1, 1, 2, 2), _gen(), NoiseOptions(), **kw)[1])


class _Recorder(torch.nn.Module):
    """A stand-in DiT predicting zeros, remembering its input (loss = mean((ε − x0)²) exposes the target)."""

    def forward(self, x, sigma, context):
        self.x, self.sigma = x.detach().clone(), sigma.detach().clone()
        return torch.zeros_like(x)


def _cfg(**options) -> SimpleNamespace:
    defaults = {"timestep_sampling": "sigmoid", "sigmoid_scale": 1.0, "discrete_flow_shift": 1.0,
                "weighting_scheme": "uniform", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29,
                "loss_type": "l2", "huber_c": 0.1}
    return SimpleNamespace(**{**defaults, **options})


def test_training_step_uses_the_options_with_per_sample_seeds():
    x0 = torch.randn(3, *SHAPE, generator=_gen(1))
    ctx = torch.zeros(3, 2, 4)
    dit = _Recorder()
    plain = training_step(dit, x0, ctx, _cfg(), sample_seeds=[11, 12, 13])
    plain_x = dit.x
    ip = training_step(dit, x0, ctx, _cfg(ip_noise_gamma=0.5), sample_seeds=[11, 12, 13])
    assert torch.equal(ip, plain)  # same σ, same target ε − x0: ξ is not in the target
    assert not torch.allclose(dit.x, plain_x)  # … but it is in the model input
    every = _cfg(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.01,
                 multires_noise_iterations=4, multires_noise_discount=0.3, ip_noise_gamma=0.1,
                 ip_noise_gamma_random_strength=True, min_timestep=100, max_timestep=900)
    training_step(dit, x0, ctx, every, sample_seeds=[11, 12, 13])
    together = dit.x
    assert 0.1 <= float(dit.sigma.min()) and float(dit.sigma.max()) <= 0.9
    # each sample's noise is a function of its own seed and latents: batched or alone, the same input
    training_step(dit, x0[2:], ctx[2:], every, sample_seeds=[13])
    assert torch.equal(dit.x[0], together[2])
    # and it is what draw_noise_and_sigma gives for that seed
    noise, sigma, noise_in = draw_noise_and_sigma(1, SHAPE, _gen(13), NoiseOptions.from_config(every), x0=x0[2:],
                                                  method="sigmoid", patches=12)
    torch.testing.assert_close(together[2:], (1 - sigma) * x0[2:] + sigma * noise_in, rtol=0, atol=0)


def test_config_accepts_kohya_values_and_checks_them(tmp_path):
    base = ["--pretrained_model_name_or_path", "d.safetensors", "--qwen3", "q.safetensors", "--vae",
            "v.safetensors", "--output_dir", str(tmp_path), "--dataset_config", "x.toml"]
    cfg = parse_train_args([*base, "--noise_offset", "0.05", "--noise_offset_random_strength",
                            "--adaptive_noise_scale", "0.01", "--multires_noise_iterations", "6",
                            "--ip_noise_gamma", "0.1", "--min_timestep", "100", "--max_timestep", "900",
                            "--min_snr_gamma", "5", "--debiased_estimation_loss"])
    assert NoiseOptions.from_config(cfg) == NoiseOptions(0.05, True, 0.01, 6, 0.3, 0.1, False, 100, 900)
    toml = tmp_path / "gui.toml"  # GUIs write kohya's None as ""
    toml.write_text('noise_offset = ""\nip_noise_gamma = ""\nmin_snr_gamma = ""\nmax_timestep = 1000\n')
    assert NoiseOptions.from_config(parse_train_args([*base, "--config_file", str(toml)])) == NoiseOptions(
        max_timestep=1000)
    with pytest.raises(ConfigError, match="adaptive_noise_scale: needs noise_offset"):
        parse_train_args([*base, "--adaptive_noise_scale", "0.01"])
    with pytest.raises(ConfigError, match="min_timestep: 600 is above max_timestep 500"):
        parse_train_args([*base, "--min_timestep", "600", "--max_timestep", "500"])
    with pytest.raises(ConfigError, match="max_timestep"):
        parse_train_args([*base, "--max_timestep", "1001"])


def test_start_up_notices(caplog):
    assert objective_notices(_cfg()) == []
    notes = objective_notices(_cfg(min_snr_gamma=5.0, debiased_estimation_loss=True, v_pred_like_loss=0.1,
                                   scale_v_pred_loss_like_noise_pred=True))
    assert [n.split(":")[0] for n in notes] == ["min_snr_gamma = 5.0", "debiased_estimation_loss = true",
                                                "v_pred_like_loss = 0.1", "scale_v_pred_loss_like_noise_pred = true"]
    assert all("no effect for Anima" in n for n in notes)
    assert "kohya's Anima trainer ignores it too" in notes[0]
    # settings without effect for the chosen timestep_sampling are the loader's (test_compat_rules.py), said once
    assert objective_notices(_cfg(discrete_flow_shift=3.0, weighting_scheme="logit_normal")) == []
    # applied here though kohya's Anima trainer drops them: said once, so a comparison with kohya is not puzzling
    [applied] = objective_notices(_cfg(noise_offset=0.05, min_timestep=10, max_timestep=1000))
    assert applied.startswith("noise_offset = 0.05, min_timestep = 10: applied")
    assert objective_notices(_cfg(min_timestep=0, max_timestep=1000)) == []  # the full range, as GUIs write it
    assert objective_notices(_cfg(ip_noise_gamma=0.1)) == []  # kohya's Anima trainer applies it too
