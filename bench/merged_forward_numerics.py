"""Numerics of LoKr's merged forward (network_args merged_forward): one bf16 GEMM with bf16(W + ΔW) against the
separate path bf16(W x) + bf16(ΔW) x, both compared with an fp32 reference; no timing (runs on CPU).

Why it decides the default: rounding W + ΔW to bf16 erases the part of ΔW below half an ulp of W, so when the
factors are small (early training, ‖ΔW‖ ≪ ‖W‖) the merged forward does not see the update at all, while the
separate branch keeps it (rounded relative to itself).  Per ratio ‖ΔW‖_rms / ‖W‖_rms it reports the rel. L2
error against the fp32 reference (x and W the bf16 values in fp32, ΔW exact) of

* `out`: the layer output;
* `effect`: out − W x (exact) against x ΔWᵀ: the update as the next layer sees it, relative to its own size
  (small updates drown in the output's bf16 rounding on both paths);
* `seen`: the share of the update the forward applies on average, <effect, x ΔWᵀ> / ‖x ΔWᵀ‖² (1 = unbiased;
  rounding noise averages out over steps, a missing share does not);
* `grad_w1`, `grad_w2`: the LoKr factor gradients for a fixed upstream gradient;
* `grad_x`: the input gradient.

Usage: python bench/merged_forward_numerics.py [--tokens 512] [--width 2048] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
import torch.nn.functional as F

RATIOS = (1e-4, 1e-3, 1e-2, 1e-1)
PATHS = ("separate", "merged")


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30))


def seen(effect: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((effect.double() * ref).sum() / ref.pow(2).sum().clamp(min=1e-30))


def lokr_factors(width: int, ratio: float, w_rms: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """kron(w1, w2) factors (w1 [f, f], w2 [width/f, width/f], f = 8: LoKr factor 8) scaled so that
    rms(kron(w1, w2)) = ratio · w_rms."""
    f = 8
    w1, w2 = torch.randn(f, f, generator=g), torch.randn(width // f, width // f, generator=g)
    scale = ratio * w_rms / float(torch.kron(w1, w2).pow(2).mean().sqrt())
    return w1 * scale ** 0.5, w2 * scale ** 0.5


def run_path(path: str, x: torch.Tensor, w: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
             grad_out: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Output, effect and gradients of one path in `dtype` (fp32 factors, as training keeps them)."""
    exact_base = F.linear(x.double(), w.double()).float()
    x = x.detach().to(dtype, copy=True).requires_grad_()
    w1, w2 = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    dw = torch.kron(w1, w2)
    wd = w.to(dtype)
    if path == "separate":
        out = F.linear(x, wd) + F.linear(x, dw.to(dtype))
    else:
        out = F.linear(x, (wd.float() + dw).to(dtype))
    out.backward(grad_out.to(dtype))
    return {"out": out.detach(), "effect": (out.float() - exact_base).detach(), "grad_w1": w1.grad, "grad_w2": w2.grad,
            "grad_x": x.grad}


def measure(tokens: int = 512, width: int = 2048, ratios: tuple[float, ...] = RATIOS, seed: int = 0,
            dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:
    """One row per (ratio, path): rel. L2 errors against the fp32 reference (module doc)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(width, width, generator=g) * 0.02).to(dtype).float()  # W ~ N(0, 0.02), stored in bf16
    x = torch.randn(tokens, width, generator=g).to(dtype).float()
    grad_out = (torch.randn(tokens, width, generator=g) * 1e-3).to(dtype).float()
    w_rms = float(w.pow(2).mean().sqrt())
    rows = []
    for ratio in ratios:
        w1, w2 = lokr_factors(width, ratio, w_rms, g)
        ref = run_path("separate", x, w, w1, w2, grad_out, torch.float32)
        ref["effect"] = F.linear(x, torch.kron(w1, w2))
        for path in PATHS:
            got = run_path(path, x, w, w1, w2, grad_out, dtype)
            rows.append({"ratio": ratio, "path": path, "dtype": str(dtype).removeprefix("torch."),
                         **{k: rel(got[k], ref[k]) for k in ("out", "effect", "grad_w1", "grad_w2", "grad_x")},
                         "seen": seen(got["effect"], ref["effect"])})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| ‖ΔW‖/‖W‖ | path | out | effect (ΔW x) | update seen | grad w1 | grad w2 | grad x |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ratio']:g} | {r['path']} | {r['out']:.2e} | {r['effect']:.2e} | {r['seen']:.3f} "
                     f"| {r['grad_w1']:.2e} "
                     f"| {r['grad_w2']:.2e} | {r['grad_x']:.2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    rows = measure(args.tokens, args.width, seed=args.seed)
    print(f"torch {torch.__version__}, {args.tokens} tokens, width {args.width}, rel. L2 error vs fp32 reference")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
