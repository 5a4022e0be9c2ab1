"""Memory options of a DiT training step: checkpointing depth and mode, activation offload, block swap, fp8.

* `run_blocks` is AnimaDiT.forward's block loop.  With `gradient_checkpointing` the first `checkpoint_blocks`
  blocks (default: all) are checkpointed (non-reentrant, so LoRA hooks work), the rest keep their
  activations: a speed/memory dial.  `checkpoint_mode = "selective"` keeps the outputs of the expensive ops
  (matmuls, attention) and recomputes only the cheap ones (norms, modulation, GELU, RoPE, casts) in backward,
  via torch's selective-checkpoint contexts.  `cpu_offload_checkpointing` parks the residual each checkpointed
  block keeps in pinned CPU memory (offload.ActivationOffloader), block swap streams weights (offload.BlockSwapper).
* fp8 storage (`quantize_fp8`): the blocks' attention and MLP Linear weights are stored as float8 with one fp32
  scale per tensor (w ≈ w8 · scale, kohya's `fp8_scaled`) and dequantised to the compute dtype inside the
  Linear's forward; the LoRA hooks still wrap a Linear whose forward they call.
* `setup_memory` applies the options of a TrainConfig in the right order; `SavedTensorLedger` measures what a
  forward leaves for backward (tests, benchmarks); `estimate_training_memory` predicts a step's peak from the
  config (calibrated against the H200 table, for VRAM-budget planning).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from anima_trainer.models import offload
from anima_trainer.models.offload import ActivationOffloader, BlockSwapper, move_except_blocks, swap_indices

if TYPE_CHECKING:
    from anima_trainer.models.dit import AnimaDiT

__all__ = ["CHECKPOINT_MODES", "FP8_FORMATS", "Fp8Linear", "SELECTIVE_SAVE_OPS", "SavedTensorLedger",
           "add_selective_save_op", "check_network_fp8", "checkpointed_count", "dequantize_fp8",
           "estimate_training_memory", "fp8_targets", "has_fp8", "quantize_fp8", "refuse_fp8", "run_blocks",
           "setup_memory"]

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


_SAC_OBSERVERS: list[Callable[[Any], None]] = []  # SavedTensorLedger sees the selective caches


def selective_checkpoint_contexts() -> tuple[Any, Any]:
    """The (forward, recompute) context pair for `checkpoint(..., context_fn=...)` in selective mode."""
    contexts = create_selective_checkpoint_contexts(_selective_policy)
    for observe in _SAC_OBSERVERS:
        observe(contexts[0])
    return contexts


def checkpointed_count(dit: AnimaDiT) -> int:
    """How many blocks (the first N) this forward checkpoints: 0 without grad or with checkpointing off."""
    if not (dit.gradient_checkpointing and torch.is_grad_enabled()):
        return 0
    n = len(dit.blocks)
    return n if dit.checkpoint_blocks is None else min(dit.checkpoint_blocks, n)


def _swapped_call(swapper: BlockSwapper, i: int, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    swapper.ensure(i)  # the recompute in backward runs this again: the weights must be on the device then too
    return block(*args)


def run_blocks(dit: AnimaDiT, tokens: torch.Tensor, emb: torch.Tensor, adaln_lora: torch.Tensor,
               context: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The DiT's block loop with checkpointing (depth, mode, CPU offload) and block swap applied."""
    n_ckpt = checkpointed_count(dit)
    swapper: BlockSwapper | None = dit.block_swapper
    offloader: ActivationOffloader | None = dit.activation_offloader if n_ckpt else None
    ckpt_kw: dict[str, Any] = {"use_reentrant": False}
    if dit.checkpoint_mode == "selective":
        ckpt_kw["context_fn"] = selective_checkpoint_contexts
    if swapper is not None:
        swapper.begin_forward(training=torch.is_grad_enabled())
    if offloader is not None:
        offloader.begin_forward()
    for i, block in enumerate(dit.blocks):
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


# ------------------------------------------------------------------------------------------------ fp8 --
FP8_FORMATS = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# Which block Linears are stored in fp8: attention (q/k/v/output_proj) and MLP, 91 % of a block's weights.
# The adaLN modulation Linears (shift/scale/gate of every token), norms, embedders, final layer and the LLM
# adapter stay in the compute dtype, as in kohya's fp8 exclude list.
FP8_SKIP = ("adaln_modulation",)


def _dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.to(dtype).mul_(scale)  # in-place on the fresh cast; the fp32 scale multiplies in fp32


class _Fp8Matmul(torch.autograd.Function):
    """y = x · (w8 · s)ᵀ; backward recomputes the dequantised weight, so autograd keeps only the fp8 tensor."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        return F.linear(x, _dequantize(weight, scale, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight, scale = ctx.saved_tensors
        return grad.matmul(_dequantize(weight, scale, grad.dtype)), None, None


class Fp8Linear(nn.Linear):
    """A frozen Linear whose weight is stored as float8 plus an fp32 `weight_scale` (set by `quantize_fp8`).

    The class of an existing nn.Linear is switched in place, so module paths, LoRA targets and the objects
    networks hold stay the same; `weight` is the fp8 Parameter (requires_grad False)."""

    weight_scale: torch.Tensor
    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Fp8Matmul.apply(x, self.weight, self.weight_scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return _dequantize(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.weight.dtype}, scale={float(self.weight_scale):.3e}"


def fp8_targets(dit: nn.Module) -> dict[str, nn.Linear]:
    """{path: Linear} of the DiT blocks' Linears that fp8 storage applies to (attention and MLP)."""
    return {f"blocks.{name}": m for name, m in dit.blocks.named_modules()
            if isinstance(m, nn.Linear) and not any(s in name for s in FP8_SKIP)}


@torch.no_grad()
def quantize_linear_(linear: nn.Linear, fmt: str = "e4m3fn", work_device: torch.device | None = None) -> None:
    """Store `linear`'s weight as fp8 with a per-tensor scale amax/fp8_max (computed in fp32)."""
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fp8_format must be one of {sorted(FP8_FORMATS)}, got {fmt!r}")
    if getattr(linear, "_anima_network_hooked", False):
        raise ValueError("quantize fp8 before injecting a network: the hook calls the Linear's forward it saw")
    if isinstance(linear, Fp8Linear):
        return
    dtype8 = FP8_FORMATS[fmt]
    home = linear.weight.device
    w = linear.weight.detach().to(work_device or home, torch.float32)
    amax = w.abs().amax()
    scale = torch.where(amax > 0, amax / torch.finfo(dtype8).max, torch.ones_like(amax))
    q = (w / scale).clamp_(-torch.finfo(dtype8).max, torch.finfo(dtype8).max).to(dtype8)
    compute_dtype = linear.weight.dtype
    linear.weight = nn.Parameter(q.to(home), requires_grad=False)
    linear.register_buffer("weight_scale", scale.to(home))
    linear.__class__ = Fp8Linear
    linear.compute_dtype = compute_dtype


def quantize_fp8(dit: AnimaDiT, fmt: str = "e4m3fn", work_device: torch.device | str | None = None) -> int:
    """fp8 storage for the blocks' attention and MLP Linears (before any network is injected and before block
    swap is enabled); returns how many Linears were converted.  `work_device` does the math (e.g. the GPU)."""
    if getattr(dit, "block_swapper", None) is not None:
        raise ValueError("quantize fp8 before enabling block swap (the swapper keeps copies of the weights)")
    targets = fp8_targets(dit)
    wd = torch.device(work_device) if work_device is not None else None
    for linear in targets.values():
        quantize_linear_(linear, fmt, wd)
    return len(targets)


def has_fp8(dit: nn.Module) -> bool:
    return any(isinstance(m, Fp8Linear) for m in dit.modules())


def refuse_fp8(dit: nn.Module, what: str) -> None:
    """Raise for operations that read or write raw weights (merging, DoRA): fp8 values without their scale
    would be silently wrong.  `dequantize_fp8` first, or load the DiT without fp8_base."""
    if has_fp8(dit):
        raise ValueError(f"{what}: this DiT stores its block weights in fp8 (fp8_base); load it without fp8_base "
                         "(or call models.memory.dequantize_fp8 first)")


@torch.no_grad()
def dequantize_fp8(dit: nn.Module) -> int:
    """Undo `quantize_fp8` (weights become the dequantised values in their original dtype); returns the count."""
    count = 0
    for m in dit.modules():
        if not isinstance(m, Fp8Linear):
            continue
        if getattr(m, "_anima_network_hooked", False):
            raise ValueError("remove the injected network before dequantising (its hook calls the fp8 forward)")
        w = m.dequantized_weight(m.compute_dtype)
        del m._buffers["weight_scale"]
        m.__class__ = nn.Linear
        m.weight = nn.Parameter(w, requires_grad=False)
        del m.compute_dtype
        count += 1
    return count


def check_network_fp8(dit: nn.Module, network: nn.Module) -> None:
    """DoRA reads the raw base weight (its column norms): refuse it on an fp8 DiT."""
    if not has_fp8(dit):
        return
    dora = [m.path for m in getattr(network, "lora_modules", []) if getattr(m, "dora_wd", False)
            and isinstance(m._org[0], Fp8Linear)]
    if dora:
        raise ValueError(f"fp8_base: DoRA (dora_wd) needs the full-precision base weight of {dora[:3]}...; "
                         "turn off fp8_base or dora_wd")


# ---------------------------------------------------------------------------------------------- setup --
def setup_memory(dit: AnimaDiT, *, device: torch.device | str, gradient_checkpointing: bool = False,
                 checkpoint_blocks: int | None = None, checkpoint_mode: str = "full",
                 cpu_offload_checkpointing: bool = False, blocks_to_swap: int = 0, swap_prefetch: int = 1,
                 fp8_base: bool = False, fp8_format: str = "e4m3fn") -> AnimaDiT:
    """Apply every memory option to a freshly loaded, frozen DiT, before a network is injected.

    Order: non-swapped parts to `device` → fp8 storage (math on `device`) → block swap (pinned CPU masters)
    → checkpoint flags.  The DiT may come from `load_dit(..., device="cpu")` (best with block swap: the swapped
    blocks never touch the device) or already be on `device`."""
    device = torch.device(device)
    n = len(dit.blocks)
    if checkpoint_mode not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint_mode must be one of {CHECKPOINT_MODES}, got {checkpoint_mode!r}")
    if checkpoint_blocks is not None and not 0 <= checkpoint_blocks <= n:
        raise ValueError(f"checkpoint_blocks = {checkpoint_blocks}: this DiT has {n} blocks (0..{n})")
    if cpu_offload_checkpointing and not gradient_checkpointing:
        raise ValueError("cpu_offload_checkpointing needs gradient_checkpointing")
    swapped = swap_indices(n, blocks_to_swap)
    swapped_blocks = [dit.blocks[i] for i in swapped]
    move_except_blocks(dit, swapped_blocks, device)
    if fp8_base:
        quantize_fp8(dit, fp8_format, work_device=device)
    dit.block_swapper = BlockSwapper(dit.blocks, swapped, device, prefetch=swap_prefetch) if swapped else None
    dit.gradient_checkpointing = gradient_checkpointing
    dit.checkpoint_blocks = checkpoint_blocks
    dit.checkpoint_mode = checkpoint_mode
    dit.activation_offloader = ActivationOffloader(device) if cpu_offload_checkpointing else None
    return dit


# ------------------------------------------------------------------------------------------ accounting --
def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


class SavedTensorLedger:
    """Counts the bytes a forward leaves for backward, per device, each storage once.

    Seen: tensors autograd saves (everything outside checkpointed blocks, the inputs those blocks keep, and
    what the swapper's and offloader's hooks keep as they are), the outputs selective checkpointing caches, and
    the copies an ActivationOffloader parks on its storage device (`offloaded`, not part of `total`).
    Parameters/buffers of `exclude` modules and `exclude_tensors` (e.g. cached RoPE tables) are not counted."""

    def __init__(self, *exclude: nn.Module, exclude_tensors: Iterable[torch.Tensor] = ()) -> None:
        self._skip = {_storage_key(t) for m in exclude for t in [*m.parameters(), *m.buffers()]}
        self._skip |= {_storage_key(t) for t in exclude_tensors}
        self.saved: dict[tuple[str, int], int] = {}
        self.offloaded: dict[tuple[str, int], int] = {}
        self._sac: list[Any] = []

    def note_saved(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key not in self._skip:
            self.saved[key] = t.untyped_storage().nbytes()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.note_saved(t)
        return t

    def note_offloaded(self, t: torch.Tensor) -> None:
        self.offloaded[_storage_key(t)] = t.untyped_storage().nbytes()

    def __enter__(self) -> SavedTensorLedger:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        _SAC_OBSERVERS.append(self._sac.append)
        offload.SAVE_OBSERVERS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        _SAC_OBSERVERS.remove(self._sac.append)
        offload.SAVE_OBSERVERS.remove(self)

    def saved_bytes(self, device: str | None = None) -> int:
        """Bytes autograd keeps (on `device`, e.g. "cpu" or "cuda:0", when given)."""
        return sum(b for (d, _), b in self.saved.items() if device is None or d == device)

    def selective_bytes(self) -> int:
        """Bytes held by selective-checkpoint caches (read from the caching mode's storage, each storage once)."""
        seen: dict[tuple[str, int], int] = {}
        for mode in self._sac:
            for entries in getattr(mode, "storage", {}).values():
                for leaf in torch.utils._pytree.tree_leaves(entries):
                    t = getattr(leaf, "val", leaf)
                    if isinstance(t, torch.Tensor):
                        key = _storage_key(t)
                        if key not in self._skip:
                            seen[key] = t.untyped_storage().nbytes()
        return sum(seen.values())

    def summary(self) -> dict[str, int]:
        """{"saved", "selective", "offloaded", "total" (saved + selective: what stays on the compute side)}."""
        saved, selective = sum(self.saved.values()), self.selective_bytes()
        return {"saved": saved, "selective": selective, "offloaded": sum(self.offloaded.values()),
                "total": saved + selective}


def gib(nbytes: float) -> float:
    return nbytes / 2**30


# ------------------------------------------------------------------------------------------- estimator --
# What one block keeps for backward, per image token and per context row, in units of model_channels × 2 bytes
# (16 MiB per 4096 tokens at width 2048).  Measured with SavedTensorLedger on CPU (tests/models/test_memory.py
# re-measures them on a small model); with the parameter and optimizer bytes they reproduce the H200 table in
# bench/README.md within 3 %.  "full" is the block input alone: the fp32 residual stream (4 bytes).
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
    from anima_trainer.models.dit import AnimaDiT
    from anima_trainer.networks import create_network

    with torch.device("meta"):
        dit = AnimaDiT(dit_config).requires_grad_(False)
    block = sum(p.numel() for p in dit.blocks[0].parameters())
    fp8 = [m for path, m in fp8_targets(dit).items() if path.startswith("blocks.0.")]
    adapter = sum(p.numel() for p in dit.llm_adapter.parameters()) if dit.llm_adapter is not None else 0
    rest = sum(p.numel() for p in dit.parameters()) - block * len(dit.blocks) - adapter
    net = create_network(dit, dim=rank, alpha=rank, **(network_args or {}))
    lora = sum(p.numel() for p in net.trainable_parameters())
    net.remove()
    return {"block": block, "block_fp8": sum(m.weight.numel() for m in fp8), "block_fp8_linears": len(fp8),
            "largest_fp8": max((m.weight.numel() for m in fp8), default=0), "adapter": adapter, "rest": rest,
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
    # weights: resident blocks (+ the swapper's blocks in flight), the rest, the adapter, one fp8 dequant temp
    if fp8_base:
        block_bytes = (counts["block_fp8"] + 4 * counts["block_fp8_linears"]
                       + (counts["block"] - counts["block_fp8"]) * elem)
    else:
        block_bytes = counts["block"] * elem
    resident = nb - blocks_to_swap + (min(blocks_to_swap, swap_prefetch + 2) if blocks_to_swap else 0)
    adapter = counts["adapter"] if (c.has_llm_adapter if include_llm_adapter is None else include_llm_adapter) else 0
    weights = resident * block_bytes + (counts["rest"] + adapter) * elem + fp8_base * counts["largest_fp8"] * elem
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


