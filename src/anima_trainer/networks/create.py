"""`create_network`: the one entry point that builds a LoRA, LoKr or LoHa network and injects it.

It sits above base.py (what the algorithms share) and the algorithm modules (lora.py, lokr.py, loha.py), so
the algorithms import the base and this module imports the algorithms: the table `BUILDERS` is the one place
that lists them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from anima_trainer.networks import loha, lokr, lora
from anima_trainer.networks.base import AdapterNetwork
from anima_trainer.networks.formats import NetworkError

# algo name → builder(dit, dim, alpha, dropout, network_args, *, text_encoder, train_dit)
BUILDERS: dict[str, Callable[..., AdapterNetwork]] = {"lora": lora.build, "lokr": lokr.build, "loha": loha.build}


def create_network(dit: nn.Module, algo: str = "lora", dim: int = 4, alpha: float | None = 1.0,
                   dropout: float | None = None, *, text_encoder: nn.Module | None = None, train_dit: bool = True,
                   **network_args: Any) -> AdapterNetwork:
    """Build a network for `dit` (and `text_encoder`) and inject it (the forwards now include the adapter branch).

    algo: "lora" | "lokr" | "loha"; network_args: include_patterns, exclude_patterns, train_llm_adapter,
    train_norm, rank_dropout, module_dropout, loraplus_lr_ratio, loraplus_unet_lr_ratio,
    loraplus_text_encoder_lr_ratio, network_reg_dims, network_reg_lrs, verbose (all; kohya semantics,
    docs/training.md), factor, full_matrix, decompose_both (lokr), dora_wd (lora).

    text_encoder: the transformers Qwen3Model (AnimaTextEncoder.model); with it, text-encoder modules are
    created with kohya's lora_anima rule: every Linear inside Qwen3Attention / Qwen3MLP (7 per layer), the
    include/exclude patterns (the built-in exclude included), network_reg_dims and network_reg_lrs full-matched
    against the Qwen3 path (`layers.0.self_attn.q_proj`).  With sd-scripts-anima's `target_modules` (which names
    DiT modules), the text encoder gets kohya's default targets.  train_dit=False (kohya's
    network_train_text_encoder_only) creates no DiT module.  Either side may be empty, not both.
    """
    if algo not in BUILDERS:
        raise NetworkError(f"algo={algo!r} is not supported; use one of {sorted(BUILDERS)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise NetworkError(f"network dim must be a positive integer, got {dim!r}")
    if alpha is None or alpha == 0:  # kohya: no alpha means alpha = dim (scale 1)
        alpha = float(dim)
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise NetworkError(f"network alpha must be a finite number >= 0, got {alpha!r}")
    if dropout is not None and not 0.0 <= float(dropout) < 1.0:
        raise NetworkError(f"network_dropout must be in [0, 1), got {dropout!r}")
    return BUILDERS[algo](dit, dim, float(alpha), float(dropout) if dropout else None, dict(network_args),
                          text_encoder=text_encoder, train_dit=train_dit)
