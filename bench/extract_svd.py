"""`anima-trainer extract`'s cost per DiT block: the exact SVD (tools/extract.py low_rank_factors) and the error
measurement of every default LoRA target of one block of the 2B DiT (its real shapes, from the meta model),
on random full-rank ΔW — the worst case for the SVD's time, which does not depend on the values' rank.

Prints one row per module (shape, seconds) and the block's total; × 28 blocks is the SVD part of a whole-model
extract at the default targets (reading the two checkpoints comes on top).  `--all-linears` times every Linear
of the block (adaLN too).

Usage: python bench/extract_svd.py [--device cpu|cuda] [--svd exact|lowrank] [--rank 64] [--repeats 1]
       [--all-linears] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from anima_trainer.networks.convert import build_meta_dit
from anima_trainer.tools.extract import _fit, low_rank_factors, select_targets


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--svd", choices=("exact", "lowrank"), default="exact")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per module (the best is reported)")
    p.add_argument("--all-linears", action="store_true", help="every Linear of the block, not the default targets")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dit = build_meta_dit()  # the 2B config: names and shapes only
    blocks = len(dit.blocks)
    targets = {n: m for n, m in select_targets(dit, all_linears=args.all_linears).items() if n.startswith("blocks.0.")}
    g = torch.Generator().manual_seed(0)
    rows = []
    for path, linear in targets.items():
        delta = (torch.randn(linear.weight.shape, generator=g) * 1e-3).to(device)
        best = float("inf")
        for _ in range(args.repeats + (device.type == "cuda")):  # a GPU's first run warms up (cuSOLVER)
            sync(device)
            t0 = time.perf_counter()
            up, down, s = low_rank_factors(delta, args.rank, svd=args.svd)
            fit = _fit(path, delta, 1.0, up, down, s)
            sync(device)
            best = min(best, time.perf_counter() - t0)
        rows.append({"module": path, "shape": list(linear.weight.shape), "seconds": best,
                     "relative_error": fit.relative_error})
        print(f"{path:40s} {'×'.join(map(str, linear.weight.shape)):>10s} {best:8.3f} s", flush=True)
    total = sum(r["seconds"] for r in rows)
    print(f"one block: {total:.2f} s for {len(rows)} modules; × {blocks} blocks = {total * blocks:.0f} s "
          f"(--svd {args.svd}, rank {args.rank}, device {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"svd": args.svd, "device": str(device), "torch": torch.__version__, "rank": args.rank,
                       "rows": rows, "block_seconds": total, "blocks": blocks}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
