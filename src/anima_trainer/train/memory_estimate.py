"""The memory estimator behind `vram_budget_gb` and the start-up memory check: one DiT training step's peak.

`estimate_training_memory` adds up the weights (parameter counts of a DiT and its LoRA built on the meta
device), the network's parameters, gradients and optimizer state, and the activations the step keeps for
backward (per-token constants measured with tests/support/ledger.py's SavedTensorLedger), for the memory
options of a TrainConfig (`**cfg.memory_options()`).  Calibrated against the H200 table in bench/README.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from anima_trainer.models.dit import AnimaDiT
from anima_trainer.models.fp8 import fp8_targets
from anima_trainer.networks import create_network

__all__ = ["ACTIVATION_UNITS", "RESIDUAL_UNITS", "estimate_training_memory", "gib"]


def gib(nbytes: float) -> float:
    """Bytes → GiB."""
    return nbytes / 2**30


# What one block keeps for backward, per image token and per context row, in units of model_channels × 2 bytes
# (16 MiB per 4096 tokens at width 2048).  Measured with SavedTensorLedger on CPU (tests/support/ledger.py;
# tests/train/test_memory_estimate.py re-measures them on a small model); with the parameter and optimizer bytes
# they reproduce the H200 table in bench/README.md within 3 %.  "full" is the block input alone: the fp32
# residual stream (4 bytes).
ACTIVATION_UNITS = {  # dtype class → mode → (per token, per context row)
    "half": {"none": (30.0, 4.2), "selective": (15.5, 2.1), "full": (2.0, 0.0)},
    "fp32": {"none": (47.2, 6.3), "selective": (28.8, 4.1), "full": (2.0, 0.0)},
}
RESIDUAL_UNITS = 2.0  # the fp32 residual stream: what the final layer keeps, what offload moves, its gradient
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "no": torch.float32}


_COUNTS: dict[tuple, dict[str, int]] = {}


def _param_counts(dit_config: Any, rank: int, network_args: dict[str, Any] | None) -> dict[str, int]:
    """Exact parameter counts from a DiT (and LoRA) built on the meta device: no memory, no weights (cached)."""
    key = (tuple(sorted(vars(dit_config).items())), rank, tuple(sorted((network_args or {}).items())))
    if key not in _COUNTS:
        _COUNTS[key] = _count_params(dit_config, rank, network_args)
    return _COUNTS[key]


def _count_params(dit_config: Any, rank: int, network_args: dict[str, Any] | None) -> dict[str, int]:
    with torch.device("meta"):
        dit = AnimaDiT(dit_config).requires_grad_(False)
    block = sum(p.numel() for p in dit.blocks[0].parameters())
    fp8 = [m for path, m in fp8_targets(dit).items() if path.startswith("blocks.0.")]
    llm_adapter = sum(p.numel() for p in dit.llm_adapter.parameters()) if dit.llm_adapter is not None else 0
    rest = sum(p.numel() for p in dit.parameters()) - block * len(dit.blocks) - llm_adapter
    net = create_network(dit, dim=rank, alpha=rank, **(network_args or {}))
    lora = sum(p.numel() for p in net.trainable_parameters())
    net.remove()
    return {"block": block, "block_fp8": sum(m.weight.numel() for m in fp8), "block_fp8_linears": len(fp8),
            "largest_fp8": max((m.weight.numel() for m in fp8), default=0), "llm_adapter": llm_adapter, "rest": rest,
            "lora": lora}


def estimate_training_memory(dit_config: Any, *, resolution: int | tuple[int, int], batch: int = 1, rank: int = 32,
                             dtype: torch.dtype | str = torch.bfloat16, gradient_checkpointing: bool = False,
                             checkpoint_blocks: int | None = None, checkpoint_mode: str = "full",
                             cpu_offload_checkpointing: bool = False, blocks_to_swap: int = 0, swap_prefetch: int = 1,
                             fp8_base: bool = False, fp8_format: str = "e4m3fn", optimizer_state_bytes: float = 8.0,
                             include_llm_adapter: bool | None = None, context_rows: int = 512, frames: int = 1,
                             network_args: dict[str, Any] | None = None) -> dict[str, float]:
    """Peak device memory (GiB) of one LoRA training step of the DiT: weights, adapter + optimizer, activations.

    Takes `**TrainConfig.memory_options()` (fp8_format: both formats take 1 byte).  `resolution` is the image
    size in pixels (int or (height, width)); `optimizer_state_bytes` per trained
    parameter (AdamW 8, 8-bit Adam 2, Adafactor ~0); fp32 LoRA weights and gradients are counted on top.  Not
    included: the text encoder and VAE (cache their outputs or add them), the CUDA context and allocator slack
    (plan ~0.5–1 GiB).  Returns weights_gib, adapter_optimizer_gib, activations_gib, total_gib and details."""
    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    elem = torch.finfo(dtype).bits // 8
    c = dit_config
    counts = _param_counts(c, rank, network_args)
    nb, d = c.num_blocks, c.model_channels
    if not 0 <= blocks_to_swap <= nb:
        raise ValueError(f"blocks_to_swap = {blocks_to_swap}: this DiT has {nb} blocks")
    # weights: resident blocks (+ the swapper's blocks in flight), the rest, the LLM adapter, one fp8 dequant temp
    if fp8_base:
        block_bytes = (counts["block_fp8"] + 4 * counts["block_fp8_linears"]
                       + (counts["block"] - counts["block_fp8"]) * elem)
    else:
        block_bytes = counts["block"] * elem
    resident = nb - blocks_to_swap + (min(blocks_to_swap, swap_prefetch + 2) if blocks_to_swap else 0)
    with_llm_adapter = c.has_llm_adapter if include_llm_adapter is None else include_llm_adapter
    llm_adapter = counts["llm_adapter"] if with_llm_adapter else 0
    weights = resident * block_bytes + (counts["rest"] + llm_adapter) * elem + fp8_base * counts["largest_fp8"] * elem
    lora_bytes = counts["lora"] * (4 + 4 + optimizer_state_bytes)
    # activations: checkpointed blocks keep their input (or the selective caches), the others everything
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    tokens = batch * frames * math.ceil(h / 8 / c.patch_spatial) * math.ceil(w / 8 / c.patch_spatial)
    rows = batch * context_rows
    table = ACTIVATION_UNITS["fp32" if dtype == torch.float32 else "half"]
    n_ckpt = (nb if checkpoint_blocks is None else min(checkpoint_blocks, nb)) if gradient_checkpointing else 0

    def units(mode: str) -> float:
        per_token, per_row = table[mode]
        return per_token * tokens + per_row * rows

    kept = units(checkpoint_mode)
    if cpu_offload_checkpointing and n_ckpt:
        kept -= RESIDUAL_UNITS * tokens  # parked on the CPU; two blocks' worth are in flight
    held = n_ckpt * kept + (nb - n_ckpt) * units("none")
    if n_ckpt:
        held += units("none")  # one block recomputed at a time in backward
        held += RESIDUAL_UNITS * tokens * (1 + 2 * cpu_offload_checkpointing)  # final layer input (+ in flight)
    held += RESIDUAL_UNITS * tokens  # the gradient of the residual stream
    activations = held * d * 2
    total = weights + lora_bytes + activations
    return {"weights_gib": gib(weights), "adapter_optimizer_gib": gib(lora_bytes), "activations_gib": gib(activations),
            "total_gib": gib(total), "lora_params": counts["lora"], "tokens": tokens, "resident_blocks": resident,
            "block_weights_gib": gib(block_bytes), "checkpointed_blocks": n_ckpt}
