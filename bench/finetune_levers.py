"""Benchmark: the fine-tune memory levers (issue 19 item 2) → JSON: peak memory and ms/step per lever, against
train/finetune_memory.py's prediction.

The DiT with random weights in bf16 (bench/dit_step.py `build`), the parameters matching `--patterns` trained
(default: all), `setup_memory` for gradient checkpointing as training applies it, synthetic inputs shaped like a
cached run's.  Each case trains the same DiT from the same weights for `--warmup` + `--steps` steps with a
mean-square loss on the output (the flow objective costs the same), one case at a time:

* `compensated_<opt>`: bf16 weights stepped by train/bf16_update.py (the int16 remainder; no fp32 master) with
  train/fused_backward.py's `PerParameterOptimizer` after backward;
* `compensated_<opt>_fused`: the same, stepped during backward (`attach()`): no gradient set.

`--optimizer-offload`: every case with train/optimizer_offload.py's `OffloadedOptimizer` (the optimizer state and
the remainders in host memory, stepped there; not with adamw8bit, which steps CUDA tensors only).
`--blocks-to-swap N`: the `_fused` cases swap the last N blocks, trained ones included (models/offload.py: updated
on the device in backward, copied back to the host master; the prediction is train/finetune_plan.py's, with the
swapped blocks' weights off the device); the unfused cases cannot swap a trained block and run without swap.

<opt> is `adamw`, `adamw8bit` (bitsandbytes on CUDA; elsewhere its fp32 stand-in) or `adafactor` (kohya's
recipe).  Per case: the peak allocated memory (CUDA only), the median ms/step, the prediction, and a checksum of
the final weights (fused and unfused cases of one optimizer must print the same one).

Usage:  python bench/finetune_levers.py --device cuda                                        # 2B, all, 1024²
        python bench/finetune_levers.py --device cuda --patterns '^blocks\\.1[4-8]\\.'        # blocks 14-18
        python bench/finetune_levers.py --device cuda --optimizer-offload --cases compensated_adamw_fused  # host state
        python bench/finetune_levers.py --device cuda --blocks-to-swap 16 --cases compensated_adafactor_fused
        python bench/finetune_levers.py --config tiny --resolution 64 --steps 1 --warmup 0 --device cpu  # smoke
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from anima_trainer.models.block_runner import setup_memory
from anima_trainer.train.finetune_plan import finetune_peak_gib
from anima_trainer.train.fused_backward import build_per_parameter_optimizer
from anima_trainer.train.optimizer_offload import OffloadedOptimizer

try:  # run as a script: bench/ is sys.path[0]
    from dit_step import CONFIGS, CONTEXT_ROWS, build
except ImportError:  # imported as bench.finetune_levers from the repository root
    from bench.dit_step import CONFIGS, CONTEXT_ROWS, build

OPTIMIZERS = {"adamw": ("AdamW", {}), "adamw8bit": ("AdamW8bit", {}),
              "adafactor": ("AdaFactor", {"relative_step": False, "scale_parameter": False, "warmup_init": False})}
CASES = [f"compensated_{o}{f}" for o in OPTIMIZERS for f in ("", "_fused")]


def run_case(case: str, args: argparse.Namespace, device: torch.device) -> dict:
    """One lever setting: train, time, measure, predict."""
    config = CONFIGS[args.config]
    opt_name = case.removeprefix("compensated_").removesuffix("_fused")
    optimizer_type, optimizer_args = OPTIMIZERS[opt_name]
    fused = case.endswith("_fused")
    swap = args.blocks_to_swap if fused else 0
    dit = build(config, device, torch.bfloat16)  # the same random weights with or without swap
    patterns = [re.compile(p) for p in args.patterns] if args.patterns else None
    names = [n for n, _ in dit.named_parameters() if patterns is None or any(r.search(n) for r in patterns)]
    setup_memory(dit, device=device, gradient_checkpointing=args.grad_ckpt, blocks_to_swap=swap, trained=names,
                 swap_trained=bool(swap))
    trained = [dit.get_parameter(n) for n in names]
    for p in trained:
        p.requires_grad_(True)
    offload = {"kind": OffloadedOptimizer, "host": "cpu"} if args.optimizer_offload else {}
    optimizer = build_per_parameter_optimizer([{"params": trained, "lr": args.lr}], args.lr, optimizer_args,
                                              torch.device("cpu") if offload else device,
                                              optimizer_type=optimizer_type, bf16_update="compensated", **offload)
    if fused:
        optimizer.attach()
    gen = torch.Generator(device=device).manual_seed(1)
    lat = args.resolution // 8
    x = torch.randn(args.batch, 16, 1, lat, lat, device=device, generator=gen)
    t = torch.rand(args.batch, device=device, generator=gen)
    ctx = torch.randn(args.batch, CONTEXT_ROWS, config.crossattn_dim, device=device, generator=gen)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = dit(x.to(torch.bfloat16), t, ctx.to(torch.bfloat16)).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append((time.perf_counter() - start) * 1000)
    settings = {"gradient_checkpointing": args.grad_ckpt, "checkpoint_blocks": None,
                "cpu_offload_checkpointing": False, "blocks_to_swap": swap}
    levers = {"weights": "bf16_compensated", "optimizer": opt_name, "fused_backward": fused,
              "optimizer_offload": args.optimizer_offload, "ema": "none"}
    predicted = finetune_peak_gib(config, settings, levers, patterns=args.patterns,
                                  resolution=(args.resolution, args.resolution), batch=args.batch, dtype="bf16")
    checksum = sum(float(p.detach().double().sum()) for p in trained)
    row = {"case": case, "optimizer_offload": args.optimizer_offload, "blocks_to_swap": swap, "config": args.config,
           "resolution": args.resolution, "batch": args.batch,
           "grad_ckpt": args.grad_ckpt, "patterns": args.patterns or ["(all)"], "trained_params":
           sum(p.numel() for p in trained), "device": device.type, "torch": torch.__version__,
           "ms_per_step": statistics.median(times) if times else None, "loss": float(loss.detach()),
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "predicted_gib": predicted, "weights_checksum": checksum}
    del optimizer, dit, trained
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="2b")
    parser.add_argument("--patterns", nargs="*", default=None, help="regexes over parameter names (default: all)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false")
    parser.add_argument("--cases", nargs="*", choices=CASES, default=None, help="default: all (without adamw8bit "
                        "when offloaded)")
    parser.add_argument("--optimizer-offload", action="store_true", help="the optimizer state in host memory "
                        "(train/optimizer_offload.py)")
    parser.add_argument("--blocks-to-swap", type=int, default=0, help="the _fused cases swap the last N blocks, "
                        "trained ones included (models/offload.py)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.cases is None:
        args.cases = [c for c in CASES if not (args.optimizer_offload and "adamw8bit" in c)]
    if args.optimizer_offload and any("adamw8bit" in c for c in args.cases):
        parser.error("--optimizer-offload: adamw8bit (bitsandbytes) steps CUDA tensors only; choose other --cases")
    device = torch.device(args.device)
    rows = []
    for case in args.cases:
        rows.append(run_case(case, args, device))
        print(json.dumps(rows[-1]), flush=True)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"results": rows}, indent=1), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
