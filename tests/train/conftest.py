"""Shared training fixtures: the demo's tiny models and a 4-image shapes dataset, the reload check, and the
fixed-σ loss that overfit tests compare before and after training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anima_trainer.demo import write_demo_models, write_shapes_dataset
from anima_trainer.models import load_dit
from anima_trainer.networks import apply_network_file, create_network


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train")
    return {"root": root, "models": write_demo_models(root / "models", seed=3),
            "images": write_shapes_dataset(root / "images", count=4, seed=3)}


@torch.no_grad()
def check_saved_file_reproduces(run, dit_path, algo: str, **network_kwargs) -> tuple[torch.Tensor, dict]:
    """The saved file loaded onto a fresh base gives the trained model's output bit-exactly, and merged the
    ComfyUI way (fp32 weight patches) within 1e-5.  Returns (trained output, apply report) for more checks."""
    fresh = load_dit(dit_path, dtype=torch.float32)
    net = create_network(fresh, algo=algo, **network_kwargs)
    net.load_weights(run.final_path)
    net.eval()
    run.network.eval()
    x = torch.randn(2, 16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(2, 512, 64, generator=torch.Generator().manual_seed(2))
    s = torch.tensor([0.3, 0.7])
    trained = run.dit(x, s, ctx)
    assert torch.equal(fresh(x, s, ctx), trained)
    merged = load_dit(dit_path, dtype=torch.float32)
    assert not torch.allclose(merged(x, s, ctx), trained)  # the training changed something
    report = apply_network_file(merged, run.final_path)
    assert not report["not_loaded"] and not report["errors"]
    torch.testing.assert_close(merged(x, s, ctx), trained, atol=1e-5, rtol=1e-5)
    return trained, report


@torch.no_grad()
def fixed_sigma_loss(dit, models: dict, dataset_toml: Path) -> float:
    """Loss on the dataset's first batch of 4 at fixed σ (0.2, 0.5, 0.8) and noise, so before/after are
    comparable (`models`: demo.write_demo_models's paths)."""
    from anima_trainer.data import build_dataset, load_dataset_config
    from anima_trainer.models import load_text_encoder, load_vae
    from anima_trainer.train.flow import flow_loss, noisy_input
    from anima_trainer.train.inputs import TextConditioner

    te = load_text_encoder(models["qwen3"], qwen3_tokenizer_path=models["tokenizers"], dtype=torch.float32)
    vae = load_vae(models["vae"], dtype=torch.float32)
    batch = next(iter(build_dataset(load_dataset_config(dataset_toml), default_batch_size=4).epoch(0)))
    x0 = vae.encode(batch.images)
    ctx = TextConditioner(dit, te).context(batch.captions)
    gen = torch.Generator().manual_seed(0)
    total = 0.0
    for sigma in (0.2, 0.5, 0.8):
        noise = torch.randn(x0.shape, generator=gen)
        s = torch.full((x0.shape[0],), sigma)
        total += flow_loss(dit(noisy_input(x0, noise, s), s, ctx), noise - x0, s).item()
    return total / 3


@pytest.fixture
def ema_inputs(monkeypatch) -> list[list[torch.Tensor]]:
    """The weights every EMA update of the test's run averages in (a copy per update, in update order)."""
    from anima_trainer.train.ema import NetworkEMA

    seen: list[list[torch.Tensor]] = []
    real = NetworkEMA.update

    def recording(self):
        seen.append([p.detach().clone() for p in self.params])
        real(self)

    monkeypatch.setattr(NetworkEMA, "update", recording)
    return seen


def hand_ema(inputs: list[list[torch.Tensor]], decay: float) -> list[torch.Tensor]:
    """diffusers' EMA rule with warm-up computed independently of it (the oracle of the EMA tests): the first
    update copies the weights, the n-th (n ≥ 2) uses d = min(decay, n / (9 + n)); fp32."""
    expected = [t.float() for t in inputs[0]]
    for n, weights in enumerate(inputs[1:], start=2):
        d = min(decay, n / (9 + n))
        expected = [d * e + (1 - d) * w.float() for e, w in zip(expected, weights, strict=True)]
    return expected
