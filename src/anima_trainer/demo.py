"""Tiny built-in Anima models for the demo, the sampler smoke run and tests.

They use the real file formats (ComfyUI key names and prefixes, safetensors), only with small shapes
and random weights, so every loader path is exercised without downloading multi-GB checkpoints.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from anima_trainer.fileio import atomic_save
from anima_trainer.models.checkpoint import DitConfig

TINY_DIT_CONFIG = DitConfig(num_blocks=2, model_channels=64, num_heads=4, head_dim=16, mlp_dim=256,
                            adaln_lora_dim=32, crossattn_dim=64, adapter_blocks=1, adapter_dim=64,
                            adapter_heads=4, adapter_mlp_dim=128, adapter_vocab=32128, adapter_source_dim=64)


def random_dit_state_dict(config: DitConfig = TINY_DIT_CONFIG, seed: int = 0,
                          dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights for an AnimaDiT of `config`: U(-1,1)/sqrt(fan_in) matrices, gains near 1.

    Every tensor is non-zero (also the ones zero-initialised in training) so every path shows in outputs.
    """
    from anima_trainer.models.dit import AnimaDiT

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AnimaDiT(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(shapes.items()):
        u = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
        if name.endswith("norm.weight") or "_norm." in name or name.endswith(".norm.weight"):
            t = 1 + 0.2 * u
        elif name.endswith(".bias"):
            t = 0.1 * u
        elif name.endswith("embed.weight"):
            t = u
        else:
            t = u / shape[-1] ** 0.5
        out[name] = t.to(dtype).contiguous()
    return out


def write_tiny_dit(path: str | Path, config: DitConfig = TINY_DIT_CONFIG, *, prefix: str = "net.", seed: int = 0,
                   dtype: torch.dtype = torch.float32, with_adapter: bool = True,
                   extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a random DiT in the public single-file layout (`net.` keys by default)."""
    config = replace(config, has_llm_adapter=with_adapter)
    state = random_dit_state_dict(config, seed, dtype)
    tensors = {prefix + k: v for k, v in state.items()}
    tensors.update(extra or {})
    return atomic_save(tensors, path, {"format": "pt"})
