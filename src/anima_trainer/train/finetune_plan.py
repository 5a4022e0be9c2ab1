"""Memory levers of a fine-tune (training_mode = "finetune", issue 19): which blocks may swap and which Linears
may be stored in fp8 (`finetune_memory_levers`, for models/block_runner.py `setup_memory`), and the
`vram_budget_gb` plan of a fine-tune (its candidates and their predictions; train/vram_plan.py
`plan_finetune_memory` chooses).

Block swap (models/offload.py) swaps the frozen blocks as in LoRA training (host → device only).  Asking for
more blocks than are frozen swaps trained blocks too, as kohya's anima_train.py does: that needs
fused_backward_pass (each trained parameter is updated on the device while its block is resident in backward,
and the block's updated weights are copied back to the host master before it is evicted); without it the
updates would happen after backward, on weights already evicted, so such a run is a ConfigError naming the fix.
fp8 storage (models/fp8.py) applies to frozen Linears only: a trained weight is never fp8.

The plan predicts the peak with train/finetune_memory.py `estimate_finetune_memory` (the trained set under the
run's weight mode and optimizer), with the activations of each candidate's checkpointing from
train/memory_estimate.py and the weights of the blocks the swapper keeps on the host taken off.  Candidates change
memory, not results, fastest first: no checkpointing, checkpointing of the first k blocks, all blocks, offloaded
block inputs, then swap of more and more frozen blocks and, with the user's fused_backward_pass, of more and more
blocks, trained ones included (their gradients and optimizer state are where the levers put them; only the
weights leave the device).  fp8 storage is never chosen (it changes the result; the user's fp8_base is kept, as
in the LoRA plan).  The optimizer, fused_backward_pass and optimizer_offload change the run too and are the
user's choice: when nothing fits, the error names those that would make it fit, with their predicted peaks (with
fused_backward_pass, predicted with the trained blocks swapped too).  All numbers are predictions, not
measurements.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import nn

from anima_trainer.config import ConfigError, TrainConfig
from anima_trainer.config.loader import locate_in_source
from anima_trainer.models.block_runner import frozen_blocks, frozen_fp8_targets
from anima_trainer.models.fp8 import fp8_targets
from anima_trainer.networks.full_finetune import LLM_ADAPTER_PREFIX, select_parameters
from anima_trainer.train.ema import ema_on_host
from anima_trainer.train.finetune_memory import WEIGHT_MODES, estimate_finetune_memory, trained_shapes
from anima_trainer.train.memory_estimate import estimate_training_memory
from anima_trainer.train.optimizer_levers import finetune_levers

log = logging.getLogger(__name__)

__all__ = ["finetune_candidates", "finetune_memory_levers", "finetune_patterns",
           "finetune_peak_gib", "swapped_blocks", "user_levers"]

SWAP_PREFETCH = 1  # models/offload.py BlockSwapper's default: blocks in flight besides the one computing


# ----------------------------------------------------------------------------------- levers of a run --
def finetune_memory_levers(cfg: TrainConfig, dit: nn.Module) -> dict[str, Any]:
    """`setup_memory` keywords that a fine-tune adds to `cfg.memory_options()` ({} for an adapter run): the
    trained parameter names, and `swap_trained` when blocks_to_swap asks for more blocks than are frozen (needs
    fused_backward_pass: a ConfigError naming the fix without it).  fp8_base: one notice naming the trained
    Linears that stay in the compute dtype."""
    if not cfg.finetunes:
        return {}
    trained = set(select_parameters(dit, cfg.trainable_patterns, cfg.finetune_llm_adapter))
    levers: dict[str, Any] = {"trained": trained}
    frozen = frozen_blocks(len(dit.blocks), trained)
    if cfg.blocks_to_swap > len(frozen):
        if not cfg.fused_backward_pass:
            raise ConfigError(locate_in_source(cfg, swap_refusal(cfg.blocks_to_swap, len(frozen), len(dit.blocks))))
        levers["swap_trained"] = True
    if cfg.fp8_base:
        log.warning("notice: %s", fp8_notice(dit, trained, cfg.mixed_precision))
    return levers


def swap_refusal(asked: int, frozen: int, num_blocks: int) -> str:
    """Why blocks_to_swap cannot swap trained blocks without the fused backward pass, and the fix."""
    return (f"blocks_to_swap = {asked}: only {frozen} of the DiT's {num_blocks} blocks are frozen, so trained blocks "
            "would swap, and a swapped trained block is updated on the device during backward, which needs "
            f"fused_backward_pass (without it the update comes after backward, when the block is back on the host); "
            f"add fused_backward_pass = true, or set blocks_to_swap = {frozen} or less (the frozen blocks only)")


def fp8_notice(dit: nn.Module, trained: Collection[str], mixed_precision: str) -> str:
    """fp8_base in a fine-tune: how many frozen Linears are stored in fp8 and how many trained ones are not."""
    targets = fp8_targets(dit)
    frozen = frozen_fp8_targets(dit, trained)
    kept = len(targets) - len(frozen)
    dtype = "fp32" if mixed_precision == "no" else mixed_precision
    return (f"fp8_base: {len(frozen)} frozen attention/MLP Linears are stored in fp8; the {kept} holding a "
            f"trained parameter stay in {dtype} (a trained weight is never fp8)")


# ------------------------------------------------------------------------------------------ planning --
def finetune_patterns(patterns: Sequence[str] | None, train_llm_adapter: bool) -> list[str] | None:
    """The trainable_patterns as estimate_finetune_memory's `patterns`, with the LLM adapter left out unless it
    is opt-in (networks/full_finetune.py `select_parameters`)."""
    if train_llm_adapter:
        return None if not patterns else list(patterns)
    guard = f"^(?!{re.escape(LLM_ADAPTER_PREFIX)})"
    return [guard] if not patterns else [f"{guard}(?:.*?)(?:{p})" for p in patterns]


def user_levers(cfg: TrainConfig, *, dit_config: Any = None, budget_gib: float | None = None) -> dict[str, Any]:
    """The run's levers that change what trains or how (its choice, never the plan's): estimate_finetune_memory's
    weights (train/optimizer_levers.py: bf16 with compensated updates where the run uses them), optimizer,
    fused_backward, optimizer_offload and where the EMA lives (train/ema.py `ema_on_host`: `ema_device = "auto"`
    decides from the shadow of `dit_config`'s trained set against `budget_gib`; without them, on the device)."""
    name = cfg.optimizer_type.lower()
    optimizer = "adamw8bit" if "8bit" in name else "adafactor" if "adafactor" in name else "adamw"
    weights = "fp32" if cfg.mixed_precision == "no" else "bf16"
    if finetune_levers(cfg).compensated_bf16:
        weights = "bf16_compensated"
    ema = "none"
    if cfg.ema_decay is not None:
        host = cfg.ema_device == "cpu"
        if cfg.ema_device == "auto" and dit_config is not None and budget_gib is not None:
            shadow = 4 * sum(math.prod(s) for s in trained_shapes(
                dit_config, finetune_patterns(cfg.trainable_patterns, cfg.finetune_llm_adapter)).values())
            host = ema_on_host("auto", finetunes=True, shadow_bytes=shadow, device=torch.device("cpu"),
                               budget_bytes=budget_gib * 2**30)
        ema = "host" if host else "device"
    return {"weights": weights, "optimizer": optimizer, "fused_backward": bool(cfg.fused_backward_pass),
            "optimizer_offload": bool(cfg.optimizer_offload), "ema": ema}


def finetune_candidates(num_blocks: int, frozen: int, *,
                        swap_trained: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """Memory settings that leave the result unchanged, from the fastest to the most frugal: swap of the `frozen`
    blocks, then (`swap_trained`: the run has fused_backward_pass) of more blocks, trained ones included."""
    off = {"gradient_checkpointing": False, "checkpoint_blocks": None, "cpu_offload_checkpointing": False,
           "blocks_to_swap": 0}
    out = [("no checkpointing", off)]
    full = {**off, "gradient_checkpointing": True}
    out += [(f"checkpointing of {k} blocks", {**full, "checkpoint_blocks": k}) for k in range(4, num_blocks, 4)]
    out.append(("checkpointing of all blocks", full))
    offloaded = {**full, "cpu_offload_checkpointing": True}
    out.append(("all blocks + offloaded block inputs", offloaded))
    counts = [*range(4, frozen, 4), frozen] if frozen else []
    out += [(f"… + swap of {n} frozen blocks", {**offloaded, "blocks_to_swap": n}) for n in counts]
    if swap_trained and frozen < num_blocks:
        more = [*(n for n in range(4, num_blocks, 4) if n > frozen), num_blocks]
        out += [(f"… + swap of {n} blocks, {n - frozen} of them trained", {**offloaded, "blocks_to_swap": n})
                for n in more]
    return out


def swapped_blocks(num_blocks: int, frozen: Sequence[int], blocks_to_swap: int) -> list[int]:
    """The blocks that swap (models/block_runner.py setup_memory with finetune_memory_levers' keywords): the last
    `blocks_to_swap` of the `frozen` ones, or the last of all blocks when it asks for more than are frozen."""
    if not blocks_to_swap:
        return []
    pool = list(frozen) if blocks_to_swap <= len(frozen) else list(range(num_blocks))
    return pool[len(pool) - blocks_to_swap:]


def finetune_peak_gib(dit_config: Any, settings: dict[str, Any], levers: dict[str, Any], *,
                      patterns: Sequence[str] | None, resolution: tuple[int, int], batch: int, dtype: str,
                      fp8_base: bool = False) -> float:
    """Predicted peak GiB of the DiT's part of a fine-tuning step with the memory `settings` (a candidate's) and
    the user's `levers` (`user_levers`): estimate_finetune_memory with the candidate's activations, less the
    weights of the blocks the swapper keeps on the host (a trained block's in the levers' weight precision; its
    gradients and optimizer state stay where the levers put them) and, with fp8_base, the frozen fp8 Linears'
    second byte."""
    est = estimate_finetune_memory(dit_config, patterns=patterns, resolution=resolution, batch=batch, dtype=dtype,
                                   gradient_checkpointing=settings["gradient_checkpointing"], **levers)
    act = estimate_training_memory(dit_config, resolution=resolution, batch=batch, rank=1, dtype=dtype,
                                   gradient_checkpointing=settings["gradient_checkpointing"],
                                   checkpoint_blocks=settings["checkpoint_blocks"],
                                   cpu_offload_checkpointing=settings["cpu_offload_checkpointing"])["activations_gib"]
    elem = 4 if dtype in ("fp32", "no") else 2
    trained = trained_shapes(dit_config, patterns)
    block_bytes = [0.0] * dit_config.num_blocks
    trained_block_bytes = [0.0] * dit_config.num_blocks
    fp8_saved = 0.0
    for name, shape in trained_shapes(dit_config).items():
        if not name.startswith("blocks."):
            continue
        if name in trained:
            trained_block_bytes[int(name.split(".")[1])] += WEIGHT_MODES[levers["weights"]][0] * math.prod(shape)
            continue
        block_bytes[int(name.split(".")[1])] += elem * math.prod(shape)
        if fp8_base and len(shape) == 2 and "adaln_modulation" not in name:  # models/fp8.py's targets
            fp8_saved += (elem - 1) * math.prod(shape)
    frozen = [i for i in range(dit_config.num_blocks)
              if not any(n.startswith(f"blocks.{i}.") for n in trained)]
    swapped = swapped_blocks(dit_config.num_blocks, frozen, settings["blocks_to_swap"])
    in_flight = min(len(swapped), SWAP_PREFETCH + 2)  # train/memory_estimate.py's resident window
    per_block = (1 - fp8_saved / max(sum(block_bytes), 1.0)) if fp8_base else 1.0
    swapped_bytes = sum(block_bytes[i] * per_block + trained_block_bytes[i] for i in swapped)
    on_host = swapped_bytes * (len(swapped) - in_flight) / max(len(swapped), 1)
    return est["total_gib"] - est["activations_gib"] + act - (fp8_saved + on_host) / 2**30
