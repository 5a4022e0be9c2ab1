"""Numerics of the EMA of compensated bf16 weights (train/ema.py, issue 19 item 5): the EMA of the bf16 weights as
stored ("rounded", what `NetworkEMA` averages) and of their exact fp32 values ("exact": the weight joined with the
int16 remainder, train/bf16_update.py `join_fp32`), both against the EMA of an fp32-master run fed the same
gradients (the reference; the exact average must equal it bitwise).  No timing (runs on CPU).

Why it decides train/ema.py: the EMA's weights reach saves and previews through `NetworkEMA.swapped`, which
copies the fp32 shadow into the bf16 parameters, so what matters is how often, and by how much, the rounded
average moves that bf16 copy against bf16(reference).  Per learning rate it reports

* `moved`: the reference EMA's mean absolute movement from the start weights;
* `shadow_err_ulp`, `shadow_err_max_ulp`: |shadow − reference| in bf16 ulps of the reference, mean and max;
* `shadow_err_per_moved`: the mean |shadow − reference| over `moved`;
* `bf16_flipped`: the share of elements whose bf16 copy (the swap) differs from bf16(reference);
* `bf16_err_ulp`: the mean |bf16 copy − reference| in ulps (0.25 is the rounding of bf16 itself).

Setup: `--weights` values ~ N(0, 0.02) (a DiT Linear's scale), AdamW (weight decay 0.01) for `--steps` steps of a
steady gradient plus unit noise (bf16, the same for every run), ema_decay `--decay` with diffusers' warm-up.

Usage: python bench/ema_bf16_exact.py [--weights 200000] [--steps 200] [--lrs 1e-6 1e-5 1e-4] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from anima_trainer.train.bf16_update import REMAINDER_KEY, join_fp32
from anima_trainer.train.ema import NetworkEMA
from anima_trainer.train.fused_backward import build_per_parameter_optimizer


def measure(lr: float, *, weights: int, steps: int, decay: float, seed: int = 0) -> list[dict[str, Any]]:
    """One learning rate: a row for the rounded and one for the exact average."""
    g = torch.Generator().manual_seed(seed)
    bf16 = torch.nn.Parameter((torch.randn(weights, generator=g) * 0.02).to(torch.bfloat16))
    master = torch.nn.Parameter(bf16.detach().float())  # the same start value
    start = master.detach().clone()
    exact = torch.nn.Parameter(master.detach().clone())  # the joined fp32 value, refreshed after each step
    master_opt = torch.optim.AdamW([master], lr=lr, weight_decay=0.01)
    compensated = build_per_parameter_optimizer([{"params": [bf16]}], lr, [], torch.device("cpu"),
                                                optimizer_type="AdamW", bf16_update="compensated")
    emas = {name: NetworkEMA([t], decay) for name, t in (("reference", master), ("rounded", bf16), ("exact", exact))}
    drift = torch.randn(weights, generator=g) * 0.5  # a steady direction, as a fine-tune's gradients have
    for _ in range(steps):
        grad = (drift + torch.randn(weights, generator=g)).to(torch.bfloat16)
        master.grad, bf16.grad = grad.float(), grad.clone()
        master_opt.step()
        compensated.step()
        with torch.no_grad():
            exact.copy_(join_fp32(bf16.detach(), compensated.state[bf16].get(REMAINDER_KEY)))
        for ema in emas.values():
            ema.update()
    if not torch.equal(exact, master):
        raise AssertionError("the compensated weights are not the fp32 master's")
    reference = emas["reference"].shadow[0]
    ulp = torch.exp2(torch.floor(torch.log2(reference.abs().clamp_min(1e-30))) - 7)  # one bf16 ulp at each value
    moved = float((reference - start).abs().mean())
    rows = []
    for name in ("rounded", "exact"):
        shadow = emas[name].shadow[0]
        err = (shadow - reference).abs()
        swapped = shadow.to(torch.bfloat16).float()
        rows.append({"lr": lr, "average": name, "moved": moved, "shadow_err_ulp": float((err / ulp).mean()),
                     "shadow_err_max_ulp": float((err / ulp).max()),
                     "shadow_err_per_moved": float(err.mean()) / moved,
                     "bf16_flipped": float((swapped != reference.to(torch.bfloat16).float()).float().mean()),
                     "bf16_err_ulp": float(((swapped - reference).abs() / ulp).mean())})
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=int, default=200_000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4])
    parser.add_argument("--json", type=str, default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = [row for lr in args.lrs for row in measure(lr, weights=args.weights, steps=args.steps, decay=args.decay)]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"results": rows, "torch": torch.__version__}, f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
