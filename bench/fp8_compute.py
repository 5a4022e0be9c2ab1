"""Benchmark: fp8 compute of the frozen blocks (`fp8_compute`) vs bf16 → JSON: ms per block step and the error.

Issue 18 item 5: the frozen base's GEMMs in fp8 (models/fp8_compute.py) become the default only if they are faster
and their error is within the bf16-vs-fp32 error.  This script measures both on the same DiT blocks (width and
heads of the chosen config, random frozen weights, `--blocks` of them, the fp32 residual stream of a bf16 run):

* speed, per token count and batch: the blocks' forward + backward (gradients w.r.t. the residual stream and the
  LoRA factors, frozen base) in bf16 with fused q/k/v (the training default) and with fp8 compute, interleaved
  (bf16, fp8, fp8, bf16, ...) so that load from other processes hits both alike; median ms per block;
* error, per token count at batch 1: the same step in fp32 (no TF32), in bf16 and with fp8 compute, all with the
  same weights and LoRA factors; rel. L2 (‖a − b‖ / ‖b‖) of the blocks' update of the residual stream (output −
  input: the input itself would dilute the error) and of all LoRA gradients together.

`default_ok` applies the issue's rule on CUDA (null on the CPU, where fp8 is not faster by design): fp8 faster at
every measured batch, and fp8-vs-bf16 error ≤ bf16-vs-fp32 error for both the update and the LoRA gradient.

The LoRA (rank `--rank`, on the fp8 targets: attention q/k/v/output_proj and MLP) is this script's own stand-in,
computed as networks/lora.py computes it (fp32 factors cast to the input dtype, scale alpha/rank) and patched as
networks/inject.py patches (fused q/k/v adds its branch through `add_to_output`): the script needs only torch,
safetensors and src/ (no pydantic), so it runs on a bare GPU machine.  Attention: torch's default SDPA dispatch.
Its up factors are random (small), not zero, so every factor has a gradient and the branch changes the output.

Usage:  PYTHONPATH=src python3 bench/fp8_compute.py --device cuda --json-out $OUT/fp8_compute.json   # 2B, 4096 tok
        PYTHONPATH=src python3 bench/fp8_compute.py --device cpu --tokens 256 --batch 1 --steps 2 --warmup 1
        PYTHONPATH=src python3 bench/fp8_compute.py --config tiny --tokens 16 --steps 1 --warmup 0 --device cpu
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
import torch.nn.functional as F
from torch import nn

from anima_trainer.models.fp8 import fp8_targets
from anima_trainer.models.fp8_compute import enable_fp8_compute
from anima_trainer.models.layers import set_fused_qkv

try:  # run as a script: bench/ is sys.path[0]
    from dit_step import CONFIGS, CONTEXT_ROWS, build, call_timer
except ImportError:  # imported as bench.fp8_compute from the repository root
    from bench.dit_step import CONFIGS, CONTEXT_ROWS, build, call_timer

UP_STD = 0.1  # LoRA up factors ~ N(0, (UP_STD / √rank)²): a branch ~10 % of the base output, as after training


class BenchLora(nn.Module):
    """One LoRA branch patched onto a Linear: `org(x) + up(down(x)) · alpha/rank`, fp32 factors cast to x's dtype."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, gen: torch.Generator) -> None:
        super().__init__()
        device = linear.weight.device
        down = torch.randn(rank, linear.in_features, generator=gen) * linear.in_features ** -0.5
        up = torch.randn(linear.out_features, rank, generator=gen) * UP_STD * rank ** -0.5
        self.down, self.up = nn.Parameter(down.to(device)), nn.Parameter(up.to(device))
        self.scale = alpha / rank
        self.org_forward = linear.forward
        linear.forward = self.forward
        linear._anima_network_patched = True  # models/layers.patched_linear: fused q/k/v calls add_to_output

    def add_to_output(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return base + F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_to_output(self.org_forward(x), x)


def attach_lora(dit: nn.Module, rank: int, alpha: float, seed: int) -> list[nn.Parameter]:
    """A BenchLora on every fp8 target (sorted paths, one generator: equal factors in every model); its params."""
    gen = torch.Generator().manual_seed(seed)
    branches = [BenchLora(linear, rank, alpha, gen) for _, linear in sorted(fp8_targets(dit).items())]
    dit.bench_lora = branches  # plain attribute: keeps them alive without registering them as submodules
    return [p for b in branches for p in (b.down, b.up)]


def build_case(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, fp8: bool
               ) -> tuple[nn.Module, list[nn.Parameter]]:
    """The blocks (same random weights for every dtype), fused q/k/v on, fp8 compute when asked, then the LoRA."""
    config = replace(CONFIGS[args.config], num_blocks=args.blocks)
    dit = build(config, device, dtype)
    set_fused_qkv(dit, True)
    if fp8:
        enable_fp8_compute(dit, work_device=device)
    return dit, attach_lora(dit, args.rank, float(args.alpha or args.rank), args.seed)


def block_inputs(dit: nn.Module, n: int, batch: int, seed: int, device: torch.device, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, ...]:
    """(x, emb, adaln_lora, context, rope, grad_x): the blocks' inputs at n tokens, equal for every dtype."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"--tokens {n}: use square token counts (a side x side latent grid)")
    c = dit.config
    d = c.model_channels
    g = torch.Generator().manual_seed(seed + n)
    x = torch.randn(batch, n, d, generator=g).to(device, torch.float32).requires_grad_(True)  # fp32 residual
    emb = (0.1 * torch.randn(batch, 1, d, generator=g)).to(device, dtype)
    adaln_lora = (0.1 * torch.randn(batch, 1, 3 * d, generator=g)).to(device, dtype)
    context = torch.randn(batch, CONTEXT_ROWS, c.crossattn_dim, generator=g).to(device, dtype)
    grad_x = torch.randn(batch, n, d, generator=g).to(device, torch.float32)
    return x, emb, adaln_lora, context, dit.rope(1, side, side, device), grad_x


def block_step(dit: nn.Module, params: list[nn.Parameter], inputs: tuple[torch.Tensor, ...], collect: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Forward + backward through the blocks; with `collect` returns (update = output − input, the LoRA gradients
    flattened), the error measurement's values (the timed steps skip that work)."""
    x, emb, adaln_lora, context, rope, grad_x = inputs
    out = x
    for block in dit.blocks:
        out = block(out, emb, adaln_lora, context, rope)
    out.backward(grad_x)
    result = None
    if collect:
        result = (out.detach() - x.detach()).float(), torch.cat([p.grad.float().flatten() for p in params])
    x.grad = None
    for p in params:
        p.grad = None
    return result


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def measure_errors(args: argparse.Namespace, n: int, device: torch.device) -> dict[str, float]:
    """fp8 vs bf16 and bf16 vs fp32 (and fp8 vs fp32) at n tokens, batch 1: one model at a time (memory)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is fp32
    results = {}
    try:
        for name, dtype, fp8 in (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False),
                                 ("fp8", torch.bfloat16, True)):
            dit, params = build_case(args, device, dtype, fp8)
            inputs = block_inputs(dit, n, 1, args.seed, device, dtype)
            results[name] = [t.cpu() for t in block_step(dit, params, inputs, collect=True)]
            del dit, params, inputs
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    errors = {}
    for a, b in (("fp8", "bf16"), ("bf16", "fp32"), ("fp8", "fp32")):
        errors[f"update_{a}_vs_{b}"] = round(rel_l2(results[a][0], results[b][0]), 6)
        errors[f"lora_grad_{a}_vs_{b}"] = round(rel_l2(results[a][1], results[b][1]), 6)
    return errors


def time_case(args: argparse.Namespace, cases: dict[str, tuple[nn.Module, list[nn.Parameter]]], n: int, batch: int,
              device: torch.device, timed: Callable[[Callable[[], None]], float]) -> dict[str, list[float]]:
    """ms of each timed block step per setting; the settings alternate, each going first every other round."""
    inputs = block_inputs(cases["bf16"][0], n, batch, args.seed, device, torch.bfloat16)
    ms: dict[str, list[float]] = {}
    names = list(cases)
    for i in range(args.warmup + args.steps):
        for name in (names if i % 2 == 0 else names[::-1]):
            t = timed(lambda case=cases[name]: block_step(*case, inputs))
            if i >= args.warmup:
                ms.setdefault(name, []).append(t)
    return ms


def weight_mib_per_block(dit: nn.Module) -> float:
    block = dit.blocks[0]
    tensors = [*block.parameters(), *block.buffers()]
    return round(sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20, 2)


def run(args: argparse.Namespace) -> dict:
    """Errors first (one model at a time), then the bf16 and fp8 models side by side for the timings."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    config = replace(CONFIGS[args.config], num_blocks=args.blocks)
    meta = {"config": args.config, "width": config.model_channels, "heads": config.num_heads, "blocks": args.blocks,
            "rank": args.rank, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
            "warmup": args.warmup}
    report: dict = {"meta": meta, "errors": [], "results": [], "default_ok": None}
    for n in args.tokens:
        errors = {"tokens": n, "batch": 1, **measure_errors(args, n, device)}
        print(json.dumps(errors), flush=True)
        report["errors"].append(errors)
        write_json(args.json_out, report)
    cases = {"bf16": build_case(args, device, torch.bfloat16, False),
             "fp8": build_case(args, device, torch.bfloat16, True)}
    meta["weight_mib_per_block"] = {name: weight_mib_per_block(dit) for name, (dit, _) in cases.items()}
    timed = call_timer(device)
    for n in args.tokens:
        for batch in args.batch:
            ms = time_case(args, cases, n, batch, device, timed)
            per_block = {k: statistics.median(v) / args.blocks for k, v in ms.items()}
            row = {"tokens": n, "batch": batch, "block_ms_bf16": round(per_block["bf16"], 3),
                   "block_ms_fp8": round(per_block["fp8"], 3),
                   "speedup": round(per_block["bf16"] / per_block["fp8"], 3),
                   "saving_pct": round(100 * (1 - per_block["fp8"] / per_block["bf16"]), 2)}
            print(json.dumps(row), flush=True)
            report["results"].append(row)
            write_json(args.json_out, report)
    report["default_ok"] = default_ok(report, device)
    write_json(args.json_out, report)
    return report


def default_ok(report: dict, device: torch.device) -> bool | None:
    """The issue's rule (CUDA only): faster at every measured batch and error within bf16's against fp32."""
    if device.type != "cuda" or not report["results"]:
        return None
    faster = all(r["speedup"] > 1 for r in report["results"])
    within = all(e[f"{what}_fp8_vs_bf16"] <= e[f"{what}_bf16_vs_fp32"]
                 for e in report["errors"] for what in ("update", "lora_grad"))
    return faster and within


def write_json(path: str | Path | None, report: dict) -> None:
    """The report, rewritten after every measurement so a cut-off run keeps what it measured."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


def table(report: dict) -> str:
    """The markdown rows bench/README.md records."""
    device = report["meta"]["device"]
    lines = ["| device | tokens | batch | block ms bf16 / fp8 | speed-up |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {device} | {r['tokens']} | {r['batch']} | {r['block_ms_bf16']} / {r['block_ms_fp8']} "
              f"| {r['speedup']}x |" for r in report["results"]]
    lines += ["", "| tokens | update: fp8 vs bf16 / bf16 vs fp32 | LoRA grad: fp8 vs bf16 / bf16 vs fp32 |",
              "| --- | --- | --- |"]
    lines += [f"| {e['tokens']} | {e['update_fp8_vs_bf16']} / {e['update_bf16_vs_fp32']} "
              f"| {e['lora_grad_fp8_vs_bf16']} / {e['lora_grad_bf16_vs_fp32']} |" for e in report["errors"]]
    lines += ["", f"default_ok: {report['default_ok']}"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="2b", help="block width/heads (2b: 2048, 16)")
    p.add_argument("--blocks", type=int, default=2, help="blocks per block step (times are per block)")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096], help="image tokens (4096 = 1024²)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8], help="batch sizes timed")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=None, help="default: the rank")
    p.add_argument("--steps", type=int, default=10, help="timed calls per setting and case")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per setting and case")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    print(table(report))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
