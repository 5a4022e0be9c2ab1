"""A network with random (non-zero) factors, so that it changes the model's output: shared by file tests."""

from __future__ import annotations

import torch

from anima_trainer.networks import create_network


def random_network(dit, seed: int = 1, dim: int = 4, alpha: float = 2.0):
    """A LoRA on `dit` whose every factor is N(0, 0.1²) from `seed` (a fresh one has up = 0: no effect)."""
    net = create_network(dit, dim=dim, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net
