"""attention_backend: named kernels give the default's outputs and gradients (fp32 CPU: max |Δ| ≤ 1e-5 · max
|ref|), auto keeps torch's choice on the CPU and picks the fastest working kernel where it measures."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from anima_trainer.config import TrainConfig
from anima_trainer.config.errors import ConfigError
from anima_trainer.config.loader import parse_train_args
from anima_trainer.models import attention_backend as ab
from anima_trainer.models import layers
from anima_trainer.models.layers import attention
from anima_trainer.networks import create_network


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= rtol * b.abs().max())


def run(dit, network):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 1, 8, 8, generator=g), torch.rand(2, generator=g)
    ctx = torch.randn(2, 24, 64, generator=g)
    out = dit(x, t, ctx)
    out.square().mean().backward()
    grads = [p.grad.clone() for p in network.trainable_parameters()]
    network.zero_grad(set_to_none=True)
    return out.detach(), grads


def all_attention(dit):
    mods = ab.dit_attention_modules(dit)
    assert len(mods["self"]) == len(mods["cross"]) == len(dit.blocks)
    return mods["self"] + mods["cross"]


@pytest.mark.parametrize("name", ["math", "flash"])  # the kernels torch has on the CPU
def test_named_backend_matches_default(dit, name):
    network = create_network(dit, "lora", dim=4, alpha=4.0)
    with torch.no_grad():
        for p in network.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref_out, ref_grads = run(dit, network)
    assert ab.configure_attention(dit, name, "cpu") == name
    assert all(m.sdpa_backends == ab.priority(name) for m in all_attention(dit))
    out, grads = run(dit, network)
    assert close(out, ref_out)
    assert all(close(g, r) for g, r in zip(grads, ref_grads))


def test_backend_list_is_applied():
    """layers.attention runs SDPA inside sdpa_kernel(backends): with only an unavailable kernel it must fail;
    a priority list falls back to the next kernel (torch >= 2.6; older torch allows only the first)."""
    q = k = v = torch.randn(1, 8, 2, 16)
    ref = attention(q, k, v)
    assert close(attention(q, k, v, backends=(SDPBackend.MATH,)), ref)
    with pytest.raises(RuntimeError):
        attention(q, k, v, backends=(SDPBackend.EFFICIENT_ATTENTION,))  # no CPU kernel, no fallback listed
    if layers._SDPA_PRIORITY:
        assert close(attention(q, k, v, backends=ab.priority("efficient")), ref)
    else:
        with pytest.raises(RuntimeError):
            attention(q, k, v, backends=ab.priority("efficient"))


def test_auto_on_cpu_keeps_torch_choice(dit):
    assert ab.configure_attention(dit, "auto", "cpu", tokens=64) == "torch default"
    assert all(m.sdpa_backends is None for m in all_attention(dit))


def test_unusable_named_backend_is_a_startup_error(dit):
    with pytest.raises(ValueError, match="efficient kernel cannot run"):
        ab.configure_attention(dit, "efficient", "cpu")


def test_auto_picks_fastest_working_kernel(dit, monkeypatch):
    """Where auto measures (CUDA ≥ 8.0, faked here): kernels that fail are skipped, the fastest is chosen, per
    self- and cross-attention.  On the CPU only `flash` of the candidates runs."""
    monkeypatch.setattr(ab, "auto_supported", lambda device: True)
    fake_ms = {"self": {"flash": 2.0}, "cross": {"flash": 1.0}}
    seen = []

    def fake_time(name, problem, reps=5, warmup=2):
        kind = "self" if problem[1].shape[2] == problem[0].shape[2] else "cross"
        seen.append((kind, name))
        return fake_ms[kind][name]

    monkeypatch.setattr(ab, "time_kernel", fake_time)
    assert ab.configure_attention(dit, "auto", "cpu", tokens=64, context_tokens=24) == "flash"
    assert sorted(seen) == [("cross", "flash"), ("self", "flash")]  # cudnn/efficient failed their check
    assert all(m.sdpa_backends[0] == SDPBackend.FLASH_ATTENTION for m in all_attention(dit))
    # and with two working kernels of different speed (math stands in as a candidate)
    monkeypatch.setattr(ab, "AUTO_CANDIDATES", ("flash", "math"))
    fake_ms.update(self={"flash": 2.0, "math": 1.0}, cross={"flash": 1.0, "math": 3.0})
    assert ab.configure_attention(dit, "auto", "cpu", tokens=64, context_tokens=24) == \
        "self_attn=math cross_attn=flash"
    mods = ab.dit_attention_modules(dit)
    assert all(m.sdpa_backends == (SDPBackend.MATH,) for m in mods["self"])
    assert all(m.sdpa_backends[0] == SDPBackend.FLASH_ATTENTION for m in mods["cross"])


def test_check_kernel_reports_wrong_results(monkeypatch):
    problem = ab._problem(1, 16, 16, 2, 16, torch.device("cpu"), torch.float32)
    assert ab.check_kernel("math", problem) is None
    real = ab._run

    def broken(backend, q, k, v, grad):
        out = real(backend, q, k, v, grad)
        return (out[0] * 1.1, *out[1:]) if backend != SDPBackend.MATH else out

    monkeypatch.setattr(ab, "_run", broken)
    assert "differ" in ab.check_kernel("flash", problem)
    assert ab.time_kernel("math", problem, reps=1, warmup=0) > 0


def test_config_option_and_kohya_names(tmp_path):
    base = ["--pretrained_model_name_or_path", "d.safetensors", "--qwen3", "q.safetensors", "--vae",
            "v.safetensors", "--output_dir", str(tmp_path), "--dataset_config", "ds.toml"]
    assert parse_train_args(base).attention_backend == "auto"
    assert parse_train_args([*base, "--attention_backend", "cudnn"]).attention_backend == "cudnn"
    with pytest.raises(ConfigError, match="xformers is not supported"):
        parse_train_args([*base, "--attention_backend", "xformers"])
    cfg = parse_train_args([*base, "--xformers"])  # issue 14: accepted with one notice saying what runs instead
    assert cfg.attention_backend == "auto"
    assert [n for n in cfg.notices if "xformers" in n and "torch SDPA" in n] == cfg.notices and len(cfg.notices) == 1
    toml = tmp_path / "t.toml"
    toml.write_text('attn_mode = "torch"\nsdpa = true\nxformers = false\nanima_attention_backend = "torch"\n'
                    'attention_backend = "flash"\n')
    assert parse_train_args([*base, "--config_file", str(toml)]).attention_backend == "flash"
    toml.write_text('attn_mode = "xformers"\n')
    [notice] = parse_train_args([*base, "--config_file", str(toml)]).notices
    assert notice.startswith("attn_mode = 'xformers'") and "torch SDPA" in notice, notice
    assert TrainConfig.model_fields["attention_backend"].default == "auto"
