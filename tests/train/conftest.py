"""Shared training fixtures: the demo's tiny models and a 4-image shapes dataset, and the reload check."""

from __future__ import annotations

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
