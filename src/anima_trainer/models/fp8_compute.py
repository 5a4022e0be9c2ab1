"""FP8 compute of the frozen DiT blocks (`fp8_compute`): the forward GEMMs of the fp8_base targets in float8.

What is quantised, per Linear of `models.fp8.fp8_targets` (attention q/k/v/output_proj and MLP of every block):

* the input, per row (one scale per token) with a dynamic amax scale, to e4m3fn, at every call;
* the weight, stored once as e4m3fn: with fp8_base the very values and per-tensor scale fp8_base stores (reused,
  so both options together keep fp8_base's weights), without it one fp32 scale per output channel (same memory,
  a smaller error).

`torch._scaled_mm` multiplies the two (fp32 accumulation inside the kernel, both scales applied row- and
column-wise) and returns bf16, cast to the input's dtype.  What stays in the compute dtype: the network's branch
(LoRA/LoKr/LoHa), which its forward patch computes on the unquantised input and adds to this output; the adaLN
Linears, norms, embedders, final layer.

Backward: the base is frozen, so the only product needed is grad-input = grad · W.  It runs in the compute dtype
(bf16) against the dequantised fp8 weight, the weight the forward multiplied by.  Quantising the gradient too
(e5m2, as torchao's float8 training does) would speed the backward GEMM as well, but gradients span a much wider
range than activations and feed every LoRA gradient below this layer; the bf16 backward keeps the LoRA gradient's
error to the forward's quantisation alone (docs/performance.md has the numbers).  Autograd saves only the fp8
weight and its scale, no activation: like fp8_base, the layer keeps no more memory than a plain Linear.

Where it runs: CUDA sm89+ (FP8 tensor cores: Ada, Hopper, Blackwell); the CPU runs the same kernel (slowly: for
tests and the error measurement).  Convert before a network is injected and before block swap is enabled, as
fp8_base (train/model_setup.py prepare_dit does).  Fused q/k/v does not apply to these Linears (three fp8 GEMMs
run, with the same result as the separate projections).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from anima_trainer.models.fp8 import (FP8_FORMATS, Fp8Linear, Fp8Matmul, fp8_targets,
                                      quantize_linear_)

__all__ = ["FP8_COMPUTE_DTYPE", "Fp8ComputeLinear", "check_fp8_compute_device", "enable_fp8_compute",
           "fp8_linear", "quantize_rows"]

log = logging.getLogger(__name__)

FP8_COMPUTE_DTYPE = FP8_FORMATS["e4m3fn"]  # both operands: e4m3fn (e5m2 x e5m2 has no kernel)
_FP8_MAX = torch.finfo(FP8_COMPUTE_DTYPE).max
_MIN_SCALE = 1e-12  # an all-zero row quantises to zeros instead of 0/0
GEMM_ALIGNMENT = 16  # _scaled_mm needs in/out features divisible by 16 (cuBLASLt / CUTLASS alignment)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): a 2-D tensor in e4m3fn with one fp32 scale per row, t ≈ q · scale, scale = amax(row) / 448."""
    scale = (t.abs().amax(dim=-1, keepdim=True).float() / _FP8_MAX).clamp_min_(_MIN_SCALE)
    return (t / scale).clamp_(-_FP8_MAX, _FP8_MAX).to(FP8_COMPUTE_DTYPE), scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x · (weight · scale)ᵀ with the input quantised per row: `weight` e4m3fn [out, in], `scale` fp32 [out, 1];
    returns x's dtype (the kernel's output is bf16)."""
    shape = x.shape
    q, x_scale = quantize_rows(x.reshape(-1, shape[-1]))
    y = torch._scaled_mm(q, weight.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=torch.bfloat16)
    return y.view(*shape[:-1], weight.shape[0]).to(x.dtype)


class _Fp8ComputeMatmul(Fp8Matmul):
    """Forward in fp8 (`fp8_linear`); backward as fp8 storage's: grad-input in the gradient's dtype against the
    dequantised weight (autograd keeps only the fp8 tensor and its scale)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        return fp8_linear(x, weight, scale)


class Fp8ComputeLinear(Fp8Linear):
    """An Fp8Linear whose forward GEMM runs in fp8; `weight_scale` is fp32 [out, 1] (one scale per output channel,
    or fp8_base's per-tensor scale repeated).  Everything that refuses an fp8 base (merging, DoRA) refuses it too,
    and `models.fp8.dequantize_fp8` turns it back into a plain Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Fp8ComputeMatmul.apply(x, self.weight, self.weight_scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"{nn.Linear.extra_repr(self)}, fp8 compute={self.weight.dtype}, "
                f"scale={float(self.weight_scale.max()):.3e} (max of {self.weight_scale.numel()})")


def fp8_compute_fits(linear: nn.Linear) -> bool:
    """Whether `_scaled_mm` takes this Linear's shape (in and out features divisible by 16)."""
    return linear.in_features % GEMM_ALIGNMENT == 0 and linear.out_features % GEMM_ALIGNMENT == 0


@torch.no_grad()
def _convert(linear: nn.Linear, fp8_base: bool, work_device: torch.device | None) -> None:
    if getattr(linear, "_anima_network_patched", False):
        raise ValueError("fp8_compute: convert before injecting a network (the patch calls the forward it saw)")
    if not isinstance(linear, Fp8Linear) and fp8_base:
        quantize_linear_(linear, "e4m3fn", work_device)  # exactly what fp8_base stores
    if isinstance(linear, Fp8Linear):
        if linear.weight.dtype != FP8_COMPUTE_DTYPE:
            raise ValueError(f"fp8_compute: needs e4m3fn weights, this fp8 base stores {linear.weight.dtype}; use "
                             "fp8_format = \"e4m3fn\"")
        scale = linear.weight_scale.reshape(-1, 1).expand(linear.out_features, 1).contiguous()
    else:
        home, compute_dtype = linear.weight.device, linear.weight.dtype
        q, scale = quantize_rows(linear.weight.detach().to(work_device or home, torch.float32))
        linear.weight = nn.Parameter(q.to(home), requires_grad=False)
        linear.compute_dtype = compute_dtype
        scale = scale.to(home)
    linear.register_buffer("weight_scale", scale)
    linear.__class__ = Fp8ComputeLinear


def enable_fp8_compute(dit: nn.Module, *, fp8_base: bool = False,
                       work_device: torch.device | str | None = None) -> int:
    """Make the fp8_base targets of `dit` Fp8ComputeLinears (before a network is injected and before block swap);
    returns how many were converted.  `fp8_base`: quantise as fp8_base does (per-tensor scale); otherwise one scale
    per output channel.  Linears that fp8 storage converted already are reused as they are; a Linear whose shape
    `_scaled_mm` cannot take stays as it is (none in Anima's DiT).  `work_device` does the math (e.g. the GPU)."""
    runner = getattr(dit, "runner", None)
    if runner is not None and runner.swapper is not None:
        raise ValueError("fp8_compute: convert before enabling block swap (the swapper keeps copies of the weights)")
    wd = torch.device(work_device) if work_device is not None else None
    count = 0
    for linear in fp8_targets(dit).values():
        if isinstance(linear, Fp8ComputeLinear) or not fp8_compute_fits(linear):
            count += isinstance(linear, Fp8ComputeLinear)
            continue
        _convert(linear, fp8_base, wd)
        count += 1
    log.info("fp8 compute: %d block Linears run their forward GEMM in fp8 (e4m3fn, %s weight scale)", count,
             "per-tensor" if fp8_base else "per-channel")
    return count


def check_fp8_compute_device(device: torch.device | str) -> None:
    """Raise ValueError where fp8 GEMMs cannot run: CUDA below sm89, ROCm, MPS and other devices.  The CPU passes
    (torch's CPU kernel computes the same products; it is no faster than bf16 there)."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type == "cuda" and torch.version.hip is None:
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 9):
            return
        raise ValueError(f"fp8_compute: {torch.cuda.get_device_name(device)} (sm{major}{minor}) has no fp8 tensor "
                         "cores (needs sm89+: RTX 40xx/50xx, L4/L40, H100/H200, B200); set fp8_compute = false "
                         "(fp8_base still halves the block weights' memory)")
    what = "ROCm" if device.type == "cuda" else device.type
    raise ValueError(f"fp8_compute: fp8 GEMMs run on NVIDIA CUDA sm89+ only (and on the CPU for tests), not on "
                     f"{what}; set fp8_compute = false")
