"""Benchmark: one DiT training step (forward + backward, frozen base) → JSON with ms/step, peak memory, MFU.

The base is frozen, so the backward is what a LoRA run pays: gradients w.r.t. activations through every
linear (dX) and attention, no weight gradients.  FLOPs follow docs/anima_arch.md §9 (2 FLOPs per MAC,
context padded to 512 rows) and are computed from the config, so they hold for any width/depth:

* model_tflop_3x:   3 × forward (the full-fine-tune convention)
* lora_tflop:       2 × linear forward + 3 × attention forward (what a frozen-base LoRA step executes)

Usage:  python bench/dit_step.py --config 2b --resolution 1024 --batch 1 [--steps 10 --warmup 3]
        python bench/dit_step.py --config tiny --resolution 256 --device cpu --dtype fp32
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from anima_trainer.models.llm_adapter import CONTEXT_ROWS
from anima_trainer.models.model_files import DitConfig
from anima_trainer.models.dit import AnimaDiT
from anima_trainer.train.step_time import forward_flops  # the FLOP count, shared with the planner

CONFIGS = {
    "2b": DitConfig(has_llm_adapter=False),
    "40block": DitConfig(num_blocks=40, has_llm_adapter=False),
    "tiny": DitConfig(num_blocks=10, model_channels=256, num_heads=16, head_dim=16, mlp_dim=1024,
                      has_llm_adapter=False),  # the fixture's tiny DiT
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "RTX 4090": 165.2, "RTX 3090": 71.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def build(config: DitConfig, device: torch.device, dtype: torch.dtype) -> AnimaDiT:
    """Random weights straight on the device (no checkpoint needed for a speed measurement)."""
    with torch.device("meta"):
        model = AnimaDiT(config)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
    return model.to(dtype).requires_grad_(False)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    config = CONFIGS[args.config]
    if args.blocks:
        config = replace(config, num_blocks=args.blocks)
    model = build(config, device, dtype)
    lat = args.resolution // 8
    x = torch.randn(args.batch, 16, 1, lat, lat, device=device, dtype=torch.float32, requires_grad=True)
    sigma = torch.rand(args.batch, device=device)
    context = torch.randn(args.batch, CONTEXT_ROWS, config.crossattn_dim, device=device, dtype=dtype)
    target = torch.randn_like(x)

    def step() -> None:
        out = model(x, sigma, context)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        x.grad = None

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    tokens = (lat // config.patch_spatial) ** 2
    f = forward_flops(config, tokens)
    per_sample_3x = 3 * (f["linear"] + f["attention"])
    per_sample_lora = 2 * f["linear"] + 3 * f["attention"]
    peak = peak_tflops(device)
    achieved_3x = per_sample_3x * args.batch / seconds / 1e12
    achieved_lora = per_sample_lora * args.batch / seconds / 1e12
    return {
        "config": args.config, "blocks": config.num_blocks, "width": config.model_channels,
        "resolution": args.resolution, "batch": args.batch, "tokens": tokens, "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "ms_per_step": round(seconds * 1000, 2),
        "samples_per_s": round(args.batch / seconds, 3),
        "peak_memory_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                            if device.type == "cuda" else None),
        "forward_tflop_per_sample": round((f["linear"] + f["attention"]) / 1e12, 4),
        "model_tflop_3x_per_sample": round(per_sample_3x / 1e12, 4),
        "lora_tflop_per_sample": round(per_sample_lora / 1e12, 4),
        "achieved_tflops_3x": round(achieved_3x, 2), "achieved_tflops_lora": round(achieved_lora, 2),
        "peak_tflops": peak,
        "mfu_3x": round(achieved_3x / peak, 4) if peak else None,
        "mfu_lora": round(achieved_lora / peak, 4) if peak else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="2b")
    p.add_argument("--blocks", type=int, default=None, help="override the block count")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    print(json.dumps(run(p.parse_args())))



def call_timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    """A function that runs fn once and returns its ms: CUDA events on the GPU, perf_counter on the CPU (shared by
    bench/fused_qkv.py and bench/fp8_compute.py)."""
    if device.type == "cuda":
        def timed(fn: Callable[[], None]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def timed(fn: Callable[[], None]) -> float:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1000
    return timed


if __name__ == "__main__":
    main()
