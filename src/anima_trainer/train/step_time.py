"""The expected time of one training step per memory setting, for the plan `vram_budget_gb` prints.

An estimate for **an H200 (torch 2.11, bf16, LoRA rank 32)**, from the measurements in bench/README.md; other
cards are not modelled (the printed plan says so).  The model, in order:

1. Compute: the reference step, 1024² × 1 (4096 tokens), is 115.9 ms with `compile_blocks` and 184.4 ms eager
   (H200, f5af62b).  Other shapes scale with the FLOPs of a frozen-base LoRA step, batch × (2 × linear +
   3 × attention forward FLOPs) (`forward_flops`, the count bench/train_step.py's MFU uses).  Larger batches run
   at a higher MFU than that assumes (×4 measured 653 / 401 ms against 738 / 464 scaled), so this errs slow.
2. Gradient checkpointing of all blocks multiplies the compute by the measured 1.42 (compiled: 164.8 / 115.9)
   or 1.73 (eager: 318.6 / 184.4); checkpointing k of N blocks by 1 + (m − 1) · k / N (the recompute of k
   blocks' forwards).  One compiled `checkpoint_blocks = 20` run measured 224.3 ms, slower than full
   checkpointing: a single outlier not used here (bench/small_cards.py measures the plans again).
3. `cpu_offload_checkpointing` adds the measured 193 ms per 4096 tokens (357.4 − 164.4 ms compiled, H200: the
   copies are not overlapped yet), scaled with the residual bytes moved (tokens × batch).
4. Block swap: each swapped block's weights cross the host link twice per step (forward and backward), on a
   side stream that overlaps with the block's compute, so a swapped block costs max(its compute, its copies).
   The copy rate, SWAP_GBPS, is an assumption (pinned host-to-device over PCIe 5.0 x16), not a measurement; the
   one measurement (26 of 28 blocks swapped, eager, checkpointing) showed no slowdown (288.3 vs 318.6 ms),
   which the model reproduces (the copies hide behind the compute).
"""

from __future__ import annotations

from typing import Any

from anima_trainer.models.llm_adapter import CONTEXT_ROWS

REFERENCE_TOKENS = 4096  # 1024² pixels: /8 VAE, 2×2 patches
STEP_MS = {True: 115.9, False: 184.4}  # compiled / eager, 1024² × 1, H200
FULL_CHECKPOINT_FACTOR = {True: 164.8 / 115.9, False: 318.6 / 184.4}
OFFLOAD_MS_PER_REFERENCE = 357.4 - 164.4
SWAP_GBPS = 25.0  # assumed pinned host→device copy rate (GB/s); not measured
CARD = "H200"


def forward_flops(c: Any, tokens: int, context_rows: int = CONTEXT_ROWS) -> dict[str, float]:
    """Forward FLOPs of one sample of a DiT config, split into linear and attention parts (docs/anima_arch.md §9:
    2 FLOPs per multiply-add, the context padded to `context_rows`); any token count, square or not."""
    d = c.model_channels
    per_token = 4 * d * d + 2 * d * d + 2 * d * c.mlp_dim  # self q,k,v,o + cross q,o + MLP (MACs)
    per_block_linear = 2 * tokens * per_token + 2 * context_rows * 2 * d * c.crossattn_dim  # + cross k,v
    patch_in = (c.in_channels + 1) * c.patch_spatial ** 2
    patch_out = c.out_channels * c.patch_spatial ** 2
    linear = c.num_blocks * per_block_linear + 2 * tokens * d * (patch_in + patch_out)
    attention = c.num_blocks * (4 * tokens * tokens * d + 4 * tokens * context_rows * d)
    return {"linear": float(linear), "attention": float(attention)}


def lora_step_flops(c: Any, tokens: int, batch: int) -> float:
    """Model FLOPs of a frozen-base LoRA step: batch × (2 × linear + 3 × attention forward FLOPs)."""
    f = forward_flops(c, tokens)
    return batch * (2 * f["linear"] + 3 * f["attention"])


def expected_step_ms(dit_config: Any, *, tokens: int, batch: int, compiled: bool, block_bytes: float,
                     gradient_checkpointing: bool = False, checkpoint_blocks: int | None = None,
                     cpu_offload_checkpointing: bool = False, blocks_to_swap: int = 0, **_: Any) -> float:
    """Expected ms of one step on an H200 for these memory options (`**TrainConfig.memory_options()` fits;
    options that do not change the time are ignored).  `tokens` per sample; `block_bytes` one block's weights."""
    nb = dit_config.num_blocks
    compute = STEP_MS[compiled] * lora_step_flops(dit_config, tokens, batch) / lora_step_flops(
        dit_config, REFERENCE_TOKENS, 1)
    n_ckpt = (nb if checkpoint_blocks is None else min(checkpoint_blocks, nb)) if gradient_checkpointing else 0
    compute *= 1 + (FULL_CHECKPOINT_FACTOR[compiled] - 1) * n_ckpt / nb
    offload = (OFFLOAD_MS_PER_REFERENCE * tokens * batch / REFERENCE_TOKENS
               if cpu_offload_checkpointing and n_ckpt else 0.0)
    per_block = compute / nb
    copies_ms = 2 * block_bytes / (SWAP_GBPS * 1e9) * 1000
    swap = blocks_to_swap * max(0.0, copies_ms - per_block)
    return compute + offload + swap
