"""A small random DiT (the 2B model's proportions at width 64), its inputs and a LoRA with non-zero up factors,
so every adapter gets a gradient through every path: shared by the block runner, fp8, offload and
memory-estimator tests.  "Identical" means max |Δ| ≤ TOL (in practice bit-equal)."""

from __future__ import annotations

import torch

from anima_trainer.models.model_files import DitConfig
from anima_trainer.models.dit import AnimaDiT
from anima_trainer.networks import create_network

# the 2B model's proportions at width 64 (adaLN rank = width / 8, MLP 4×, context width / 2)
SMALL = DitConfig(num_blocks=4, model_channels=64, num_heads=4, head_dim=16, mlp_dim=256, crossattn_dim=32,
                  adaln_lora_dim=8, has_llm_adapter=False)
TOL = 1e-6


def small_dit(dtype: torch.dtype = torch.float32, config: DitConfig = SMALL) -> AnimaDiT:
    torch.manual_seed(0)
    return AnimaDiT(config).to(dtype).requires_grad_(False)


def inputs(config: DitConfig = SMALL, lat: int = 16, rows: int = 512, batch: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 16, 1, lat, lat, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, rows, config.crossattn_dim, generator=g))


def lora(dit: AnimaDiT, **args: str):
    torch.manual_seed(2)
    net = create_network(dit, dim=4, alpha=4, **args)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.normal_(0, 0.05)
    return net


def step(dit: AnimaDiT, net, x, t, ctx) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = dit(x.to(dit.dtype), t, ctx.to(dit.dtype))
    out.float().square().mean().backward()
    grads = [p.grad.clone() for p in net.trainable_parameters()]
    net.zero_grad(set_to_none=True)
    return out.detach(), grads


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))
