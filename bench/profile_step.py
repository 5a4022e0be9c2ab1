"""Profile one training step (the loop's pieces, as bench/train_step.py sets them up) with torch.profiler:
prints the top CUDA kernels by time and a breakdown by kind (GEMM, attention, elementwise/norm, copies, optimizer).

Usage (GPU):  python bench/profile_step.py --resolution 1024 --batch 1 [--compile] [--grad_ckpt] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import train_step as ts  # bench/ helper module

from anima_trainer.train.flow import sample_seed, training_step
from anima_trainer.train.model_setup import prepare_dit
from anima_trainer.train.optim import build_optimizer

KINDS = (("attention", ("flash", "fmha", "cudnn", "sdpa", "attention", "efficient")),
         ("gemm", ("gemm", "sm90", "sm80", "cutlass", "matmul", "xmma", "nvjet")),
         ("optimizer", ("adam", "multi_tensor", "foreach")),
         ("copy", ("copy", "memcpy", "memset", "cat")),
         ("triton/fused", ("triton",)))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other elementwise/norm"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad_ckpt", action="store_true")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    args = ts.parse_args(["--steps", "1", "--warmup", "0"])
    levers = {"compile_blocks": True} if a.compile else {}
    cfg = ts.train_config(args, "bf16", a.grad_ckpt, **levers)
    dit = ts.build_dit("2b", device, dtype)
    network, kernel = prepare_dit(cfg, dit, device, dtype, tokens={(a.resolution // 16) ** 2}, batch=a.batch)
    optimizer = build_optimizer(network.param_groups(1e-4), 1e-4, {}, device)
    params = network.trainable_parameters()
    gen = torch.Generator().manual_seed(0)
    lat = a.resolution // 8
    latents = torch.randn(a.batch, 16, 1, lat, lat, generator=gen).to(device)
    context = torch.randn(a.batch, 512, 1024, generator=gen).to(device, dtype)

    def step() -> None:
        loss = training_step(dit, latents, context, cfg, [sample_seed(0, 0, i, 0) for i in range(a.batch)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            step()
        torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if t and "CUDA" in str(getattr(e, "device_type", "")):
            by_kind[kind_of(e.key)] += t
            rows.append((t, e.count, e.key))
    total = sum(by_kind.values())
    print(json.dumps({"resolution": a.resolution, "batch": a.batch, "compile": a.compile, "grad_ckpt": a.grad_ckpt,
                      "attention_kernel": kernel, "gpu_ms_per_step": round(total / 1000 / a.steps, 2),
                      "by_kind_ms_per_step": {k: round(v / 1000 / a.steps, 2) for k, v in
                                              sorted(by_kind.items(), key=lambda kv: -kv[1])}}))
    for t, n, key in sorted(rows, reverse=True)[: a.top]:
        print(f"{t / 1000 / a.steps:9.2f} ms/step  x{n // a.steps:5d}  {key[:110]}")
    wall = prof.key_averages().total_average()
    print("cpu total ms/step", round(wall.cpu_time_total / 1000 / a.steps, 1))


if __name__ == "__main__":
    main()
