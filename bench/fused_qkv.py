"""Benchmark: fused q/k/v alone, on vs off → JSON: one DiT block's forward + backward, and its self-attention alone.

Issue 16 item 7: fused q/k/v (`fuse_qkv`, models/layers.py) stays only if it wins >= 2 % of a training step on
a GPU.  This script measures exactly that lever and nothing else: the same DiT blocks (width and heads of the
chosen config, random frozen weights, `--blocks` of them), LoRA injected as training injects it
(`create_network`, default targets, so q/k/v carry LoRA branches; factors fp32 as in training), the attention
kernel chosen as training chooses it (`configure_attention`, auto), the fp32 residual stream of a bf16 run.
Only `set_fused_qkv(dit, on/off)` changes between the two timings, and the cases run interleaved (on, off,
on, off, ...) so that load from other processes hits both alike.

Per token count it times
* `block`: the blocks' forward + backward (gradients w.r.t. the residual stream and the LoRA factors, frozen
  base), what one block costs in a training step;
* `self_attn`: the self-attention module alone, forward + backward (q/k/v GEMMs, RoPE, SDPA, output
  projection), where the fusion acts.

and reports median ms per call for both settings, the saving (separate − fused) per block, and that saving as
a percentage of the block step with fusion off (`saving_pct_of_block`).  A block is ~1/28 of the 2B model's
step and nearly all of its time, so `saving_pct_of_block` is the lever's share of a training step (a slight
overestimate: the step also has the embedding, the final layer and the optimizer).

Usage:  python bench/fused_qkv.py --device cuda                                   # bf16, 2B width, 1024 + 4096 tokens
        python bench/fused_qkv.py --device cpu --tokens 256 1024 --steps 4 --warmup 1   # fp32
        python bench/fused_qkv.py --config tiny --tokens 16 --steps 1 --warmup 0 --device cpu   # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from anima_trainer.models.attention_backend import configure_attention
from anima_trainer.models.layers import set_fused_qkv
from anima_trainer.networks import create_network

try:  # run as a script: bench/ is sys.path[0]
    from dit_step import CONFIGS, CONTEXT_ROWS, build, call_timer
except ImportError:  # imported as bench.fused_qkv from the repository root
    from bench.dit_step import CONFIGS, CONTEXT_ROWS, build, call_timer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KEEP_PCT = 2.0  # the rule: keep fused q/k/v only if it saves >= 2 % of a step on a GPU


def time_tokens(args: argparse.Namespace, dit: torch.nn.Module, params: list[torch.Tensor], n: int,
                device: torch.device, dtype: torch.dtype, residual: torch.dtype,
                timed: Callable[[Callable[[], None]], float]) -> dict[tuple[str, bool], list[float]]:
    """ms of each timed call per (part, fused) at `n` tokens; fused and separate alternate, each going first
    every other round."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"--tokens {n}: use square token counts (a side x side latent grid)")
    config = dit.config
    d = config.model_channels
    g = torch.Generator(device="cpu").manual_seed(args.seed + n)
    rope = dit.rope(1, side, side, device)
    x = torch.randn(args.batch, n, d, generator=g).to(device, residual).requires_grad_(True)
    h = torch.randn(args.batch, n, d, generator=g).to(device, dtype).requires_grad_(True)
    emb = (0.1 * torch.randn(args.batch, 1, d, generator=g)).to(device, dtype)
    adaln_lora = (0.1 * torch.randn(args.batch, 1, 3 * d, generator=g)).to(device, dtype)
    context = torch.randn(args.batch, CONTEXT_ROWS, config.crossattn_dim, generator=g).to(device, dtype)
    grad_x = torch.randn(args.batch, n, d, generator=g).to(device, residual)
    grad_h = torch.randn(args.batch, n, d, generator=g).to(device, dtype)

    def clear() -> None:
        x.grad = h.grad = None
        for p in params:
            p.grad = None

    def block_step() -> None:
        out = x
        for block in dit.blocks:
            out = block(out, emb, adaln_lora, context, rope)
        out.backward(grad_x)
        clear()

    def self_attn_step() -> None:
        dit.blocks[0].self_attn(h, h, rope).backward(grad_h)
        clear()

    ms: dict[tuple[str, bool], list[float]] = {}
    for part, fn in (("block", block_step), ("self_attn", self_attn_step)):
        for i in range(args.warmup + args.steps):
            for fused in ((True, False) if i % 2 == 0 else (False, True)):  # alternate who goes first
                set_fused_qkv(dit, fused)
                t = timed(fn)
                if i >= args.warmup:
                    ms.setdefault((part, fused), []).append(t)
    return ms


def run(args: argparse.Namespace) -> list[dict]:
    """Build the blocks + LoRA once, then time every token count, fused and separate interleaved."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    torch.manual_seed(args.seed)
    config = replace(CONFIGS[args.config], num_blocks=args.blocks)
    dit = build(config, device, dtype)
    network = create_network(dit, "lora", dim=args.rank, alpha=float(args.alpha if args.alpha else args.rank))
    network.to(device)
    params = list(network.trainable_parameters())
    kernel = configure_attention(dit, "auto", device, dtype, tokens=max(args.tokens), batch=args.batch)
    packed = set_fused_qkv(dit, True)
    if packed != args.blocks:
        raise RuntimeError(f"fused q/k/v packed {packed} of {args.blocks} self-attention layers")
    residual = torch.float32  # the residual stream: fp32 in every run (AnimaDiT.residual_fp32 default)
    d = config.model_channels
    timed = call_timer(device)
    rows = []
    for n in args.tokens:
        ms = time_tokens(args, dit, params, n, device, dtype, residual, timed)
        med = {k: statistics.median(v) for k, v in ms.items()}
        per_block = {k: v / args.blocks if k[0] == "block" else v for k, v in med.items()}
        saving = per_block[("block", False)] - per_block[("block", True)]
        sa_saving = per_block[("self_attn", False)] - per_block[("self_attn", True)]
        pct = 100 * saving / per_block[("block", False)]
        row = {
            "config": args.config, "width": d, "heads": config.num_heads, "blocks": args.blocks, "tokens": n,
            "batch": args.batch, "rank": args.rank, "dtype": dtype_name, "attention_kernel": kernel,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
            "warmup": args.warmup,
            "block_ms_fused": round(per_block[("block", True)], 3),
            "block_ms_separate": round(per_block[("block", False)], 3),
            "self_attn_ms_fused": round(per_block[("self_attn", True)], 3),
            "self_attn_ms_separate": round(per_block[("self_attn", False)], 3),
            "saving_ms_per_block": round(saving, 3), "saving_pct_of_block": round(pct, 2),
            "self_attn_saving_ms": round(sa_saving, 3),
            "self_attn_saving_pct_of_block": round(100 * sa_saving / per_block[("block", False)], 2),
            "block_ms_min": {"fused": round(min(ms[("block", True)]) / args.blocks, 3),
                             "separate": round(min(ms[("block", False)]) / args.blocks, 3)},
            # the rule applies to GPU numbers only; on the CPU this is a measurement, not a decision
            "keep_by_rule": (pct >= KEEP_PCT) if device.type == "cuda" else None,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.json_out:
            write_json(args.json_out, rows)
    network.remove()
    return rows


def write_json(path: str | Path, rows: list[dict]) -> None:
    """{results: rows}, rewritten after every token count so a cut-off run keeps what it measured."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": rows}, indent=1) + "\n", encoding="utf-8")


def table(rows: list[dict]) -> str:
    """The markdown rows bench/README.md records."""
    lines = ["| device | dtype | tokens | block ms fused / separate | self-attn ms fused / separate "
             "| saving ms/block | % of block step |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['dtype']} | {r['tokens']} | {r['block_ms_fused']} / "
                     f"{r['block_ms_separate']} | {r['self_attn_ms_fused']} / {r['self_attn_ms_separate']} "
                     f"| {r['saving_ms_per_block']} | {r['saving_pct_of_block']} % |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="2b", help="block width/heads (2b: 2048, 16)")
    p.add_argument("--blocks", type=int, default=1, help="blocks per block step (times are per block)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="image tokens (512², 1024²)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=None, help="default: the rank")
    p.add_argument("--steps", type=int, default=20, help="timed calls per setting and case")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per setting and case")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
