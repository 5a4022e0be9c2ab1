"""fp8 storage of the DiT's block weights (`fp8_base`, kohya's `fp8_scaled`).

The blocks' attention and MLP Linear weights are stored as float8 with one fp32 scale per tensor (w ≈ w8 · scale) and
dequantised to the compute dtype inside the Linear's forward; the network's forward patches still wrap a Linear whose
forward they call.  Quantise before a network is injected and before block swap is enabled
(`block_runner.setup_memory` keeps that order).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FP8_FORMATS", "Fp8Linear", "dequantize_fp8", "dequantize_weight", "fp8_targets", "has_fp8",
           "quantize_fp8", "quantize_linear_", "refuse_fp8"]

FP8_FORMATS = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# Which block Linears are stored in fp8: attention (q/k/v/output_proj) and MLP, 91 % of a block's weights.
# The adaLN modulation Linears (shift/scale/gate of every token), norms, embedders, final layer and the LLM
# adapter stay in the compute dtype, as in kohya's fp8 exclude list.
FP8_SKIP = ("adaln_modulation",)


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight · scale in `dtype` (a per-tensor or a per-output-channel [out, 1] scale; models/fp8_compute.py)."""
    return weight.to(dtype).mul_(scale)  # in-place on the fresh cast; the fp32 scale multiplies in fp32


class Fp8Matmul(torch.autograd.Function):
    """y = x · (w8 · s)ᵀ; backward recomputes the dequantised weight, so autograd keeps only the fp8 tensor."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        return F.linear(x, dequantize_weight(weight, scale, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight, scale = ctx.saved_tensors
        return grad.matmul(dequantize_weight(weight, scale, grad.dtype)), None, None


class Fp8Linear(nn.Linear):
    """A frozen Linear whose weight is stored as float8 plus an fp32 `weight_scale` (set by `quantize_fp8`).

    The class of an existing nn.Linear is switched in place, so module paths, LoRA targets and the objects
    networks hold stay the same; `weight` is the fp8 Parameter (requires_grad False)."""

    weight_scale: torch.Tensor
    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = Fp8Matmul.apply(x, self.weight, self.weight_scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_weight(self.weight, self.weight_scale, dtype or self.compute_dtype)

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
    if getattr(linear, "_anima_network_patched", False):
        raise ValueError("quantize fp8 before injecting a network: the patch calls the Linear's forward it saw")
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


def quantize_fp8(dit: nn.Module, fmt: str = "e4m3fn", work_device: torch.device | str | None = None) -> int:
    """fp8 storage for the blocks' attention and MLP Linears (before any network is injected and before block
    swap is enabled); returns how many Linears were converted.  `work_device` does the math (e.g. the GPU)."""
    runner = getattr(dit, "runner", None)
    if runner is not None and runner.swapper is not None:
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
                         "(or call models.fp8.dequantize_fp8 first)")


@torch.no_grad()
def dequantize_fp8(dit: nn.Module) -> int:
    """Undo `quantize_fp8` (weights become the dequantised values in their original dtype); returns the count."""
    count = 0
    for m in dit.modules():
        if not isinstance(m, Fp8Linear):
            continue
        if getattr(m, "_anima_network_patched", False):
            raise ValueError("remove the injected network before dequantising (its patch calls the fp8 forward)")
        w = m.dequantized_weight(m.compute_dtype)
        del m._buffers["weight_scale"]
        m.__class__ = nn.Linear
        m.weight = nn.Parameter(w, requires_grad=False)
        del m.compute_dtype
        count += 1
    return count
