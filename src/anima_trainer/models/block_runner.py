"""How AnimaDiT runs its blocks: checkpoint depth and mode, CPU-offloaded block inputs, block swap.

`AnimaDiT.runner` is one `BlockRunner`; `dit.forward` hands it the blocks and the block inputs.  With
`gradient_checkpointing` the first `checkpoint_blocks` blocks (default: all) are checkpointed (non-reentrant, so the
networks' forward patches work), the rest keep their activations: a speed/memory dial.
`checkpoint_mode = "selective"` keeps the outputs of the expensive ops (matmuls, attention) and recomputes only the
cheap ones (norms, modulation, GELU, RoPE, casts) in backward, via torch's selective-checkpoint contexts.  The
runner's `offloader` (offload.ActivationOffloader, `cpu_offload_checkpointing`) parks the residual each checkpointed
block keeps in pinned CPU memory; its `swapper` (offload.BlockSwapper, `blocks_to_swap`) streams block weights.

`setup_memory` applies the memory options of a TrainConfig (`**cfg.memory_options()`) to a freshly loaded DiT
in the only order that works, fp8 storage (models/fp8.py) included.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from anima_trainer.models.fp8 import fp8_targets, quantize_fp8, quantize_linear_
from anima_trainer.models.offload import ActivationOffloader, BlockSwapper, move_except_blocks, swap_indices

__all__ = ["CHECKPOINT_MODES", "SELECTIVE_SAVE_OPS", "BlockRunner", "add_selective_save_op", "frozen_blocks",
           "frozen_fp8_targets", "selective_checkpoint_contexts", "setup_memory", "trained_in_blocks"]

CHECKPOINT_MODES = ("full", "selective")
aten = torch.ops.aten
# Selective checkpointing keeps the outputs of every SDPA kernel (flash, efficient, cuDNN, the CPU flash kernel)
# and of the matmuls that are expensive to redo; another attention backend registers its op with
# `add_selective_save_op`.  A matmul [m, k] @ [k, n] is kept unless its contraction is much narrower than its
# output (k · 8 < n): LoRA's up projection (k = rank) is as large as the base output but ~D/rank times cheaper.
SELECTIVE_SAVE_OPS: set = {aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_efficient_attention,
                           aten._scaled_dot_product_cudnn_attention, aten._scaled_dot_product_flash_attention_for_cpu,
                           aten._flash_attention_forward, aten._efficient_attention_forward}
MATMUL_OPS = {aten.mm: 0, aten.bmm: 0, aten._scaled_mm: 0, aten.addmm: 1, aten.baddbmm: 1}  # → index of `a`
MATMUL_MIN_RATIO = 8


def add_selective_save_op(op: Any) -> None:
    """Also keep `op`'s output in selective checkpointing (an OpOverloadPacket, e.g. a custom attention op)."""
    SELECTIVE_SAVE_OPS.add(getattr(op, "overloadpacket", op))


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    packet = getattr(op, "overloadpacket", op)
    if packet in SELECTIVE_SAVE_OPS:
        return CheckpointPolicy.MUST_SAVE
    first = MATMUL_OPS.get(packet)
    if first is not None:
        k, n = args[first + 1].shape[-2:]
        if k * MATMUL_MIN_RATIO >= n:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


# Accounting observers (tests/support/ledger.py SavedTensorLedger): each sees the forward context of every
# selective checkpoint, whose caching mode holds the kept outputs.
SAC_OBSERVERS: list[Callable[[Any], None]] = []


def selective_checkpoint_contexts() -> tuple[Any, Any]:
    """The (forward, recompute) context pair for `checkpoint(..., context_fn=...)` in selective mode."""
    contexts = create_selective_checkpoint_contexts(_selective_policy)
    for observe in SAC_OBSERVERS:
        observe(contexts[0])
    return contexts


def _swapped_call(swapper: BlockSwapper, i: int, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    swapper.ensure(i)  # the recompute in backward runs this again: the weights must be on the device then too
    return block(*args)


@dataclass
class BlockRunner:
    """The DiT's block loop and its memory settings (all off by default: a plain loop over the blocks).

    Not an nn.Module: it holds no weights of its own, and the swapper's references to the blocks must not
    register them twice."""

    gradient_checkpointing: bool = False  # recompute blocks in backward (non-reentrant: network patches work)
    checkpoint_blocks: int | None = None  # checkpoint the first N blocks (None = all)
    checkpoint_mode: str = "full"  # "full" or "selective" recompute
    offloader: ActivationOffloader | None = None  # checkpointed blocks' inputs parked on the CPU
    swapper: BlockSwapper | None = None  # block weights streamed from the CPU

    def checkpointed_count(self, num_blocks: int) -> int:
        """How many blocks (the first N) this forward checkpoints: 0 without grad or with checkpointing off."""
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return 0
        return num_blocks if self.checkpoint_blocks is None else min(self.checkpoint_blocks, num_blocks)

    def __call__(self, blocks: nn.ModuleList, tokens: torch.Tensor, emb: torch.Tensor, adaln_lora: torch.Tensor,
                 context: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Run `blocks` in order on the residual stream `tokens` with checkpointing, offload and swap applied."""
        n_ckpt = self.checkpointed_count(len(blocks))
        swapper = self.swapper
        offloader = self.offloader if n_ckpt else None
        ckpt_kw: dict[str, Any] = {"use_reentrant": False}
        if self.checkpoint_mode == "selective":
            ckpt_kw["context_fn"] = selective_checkpoint_contexts
        if swapper is not None:
            swapper.begin_forward(training=torch.is_grad_enabled())
        if offloader is not None:
            offloader.begin_forward()
        for i, block in enumerate(blocks):
            if swapper is not None:
                swapper.before_block(i)
            if i < n_ckpt:
                fn = block if swapper is None else partial(_swapped_call, swapper, i, block)
                with offloader.hooks(tokens) if offloader is not None else nullcontext():
                    tokens = checkpoint(fn, tokens, emb, adaln_lora, context, rope, **ckpt_kw)
            else:
                with swapper.saving(i) if swapper is not None else nullcontext():
                    tokens = block(tokens, emb, adaln_lora, context, rope)
            if swapper is not None:
                swapper.after_block(i, tokens)
        return tokens


DiT = TypeVar("DiT", bound=nn.Module)


def setup_memory(dit: DiT, *, device: torch.device | str, gradient_checkpointing: bool = False,
                 checkpoint_blocks: int | None = None, checkpoint_mode: str = "full",
                 cpu_offload_checkpointing: bool = False, blocks_to_swap: int = 0, swap_prefetch: int = 1,
                 fp8_base: bool = False, fp8_format: str = "e4m3fn", trained: Collection[str] = (),
                 swap_trained: bool = False) -> DiT:
    """Apply every memory option to a freshly loaded, frozen AnimaDiT, before a network is injected.

    Order: non-swapped parts to `device` → fp8 storage (math on `device`) → block swap (pinned CPU masters)
    → a new `dit.runner` with the checkpoint settings.  The DiT may come from `load_dit(..., device="cpu")`
    (best with block swap: the swapped blocks never touch the device) or already be on `device`.
    `trained`: names of DiT parameters a fine-tune trains in place; they are never stored in fp8.  A block holding
    one swaps only with `swap_trained` (the fused backward pass updates them on the device during backward, and
    the swapper copies them back to the host master: models/offload.py); without it only the frozen blocks swap."""
    device = torch.device(device)
    n = len(dit.blocks)
    if checkpoint_mode not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint_mode must be one of {CHECKPOINT_MODES}, got {checkpoint_mode!r}")
    if checkpoint_blocks is not None and not 0 <= checkpoint_blocks <= n:
        raise ValueError(f"checkpoint_blocks = {checkpoint_blocks}: this DiT has {n} blocks (0..{n})")
    if cpu_offload_checkpointing and not gradient_checkpointing:
        raise ValueError("cpu_offload_checkpointing needs gradient_checkpointing")
    swapped = swap_indices(n, blocks_to_swap, frozen_blocks(n, trained) if trained and not swap_trained else None)
    updated = trained_in_blocks(trained, swapped)
    swapped_blocks = [dit.blocks[i] for i in swapped]
    move_except_blocks(dit, swapped_blocks, device)
    if fp8_base and trained:
        for linear in frozen_fp8_targets(dit, trained).values():
            quantize_linear_(linear, fp8_format, device)
    elif fp8_base:
        quantize_fp8(dit, fp8_format, work_device=device)
    swapper = (BlockSwapper(dit.blocks, swapped, device, prefetch=swap_prefetch, updated=updated or None)
               if swapped else None)
    offloader = ActivationOffloader(device) if cpu_offload_checkpointing else None
    dit.runner = BlockRunner(gradient_checkpointing, checkpoint_blocks, checkpoint_mode, offloader, swapper)
    return dit


def frozen_blocks(num_blocks: int, trained: Collection[str]) -> list[int]:
    """Indices of the blocks none of whose parameters is in `trained` (parameter names of the DiT)."""
    holding = {int(name.split(".")[1]) for name in trained if name.startswith("blocks.")}
    return [i for i in range(num_blocks) if i not in holding]


def trained_in_blocks(trained: Collection[str], blocks: Collection[int]) -> dict[int, list[str]]:
    """{block index: names inside the block of its trained parameters} for the `blocks` holding any (the DiT's
    parameter names `trained`, e.g. "blocks.3.attn.q.weight" → {3: ["attn.q.weight"]})."""
    out: dict[int, list[str]] = {}
    for name in sorted(trained):
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            if int(index) in blocks:
                out.setdefault(int(index), []).append(rest)
    return out


def frozen_fp8_targets(dit: nn.Module, trained: Collection[str]) -> dict[str, nn.Linear]:
    """The fp8 storage targets (models/fp8.py `fp8_targets`) with no trained parameter: a fine-tune's frozen
    attention and MLP Linears."""
    trained = set(trained)
    return {path: m for path, m in fp8_targets(dit).items()
            if not any(f"{path}.{name}" in trained for name, _ in m.named_parameters())}
