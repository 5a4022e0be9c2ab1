"""Benchmark: one LoRA training step exactly as `anima_trainer.train.loop.run_training` runs it → JSON.

One step is the loop's own code path, called here, not re-implemented:

    loss = training_step(dit, latents, context, cfg, seeds)      # per-sample noise and σ, DiT + LoRA, loss
    scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
    scaler.unscale_(optimizer); clip_grad_norm_(params, cfg.max_grad_norm)
    scaler.step(optimizer); scaler.update(); scheduler.step()
    optimizer.zero_grad(set_to_none=True); loss.item()

with the DiT (random weights, frozen, built straight on the device), `prepare_dit` (LoRA on the default
targets) and `setup_optimization` (train/setup.py: optimizer, AdamW fused on CUDA, schedule, scaler) as in the
loop; the noise seeds are the loop's `sample_seed(seed, epoch, item, 0)`.  Inputs are what a
cached run feeds the step: fp32 latents [B, 16, 1, H/8, W/8] and an adapter context [B, 512, crossattn_dim]
in the model dtype (a cached or frozen LLM adapter: no text encoder, VAE or data loading is timed).

Timing: CUDA events around every step (CPU: time.perf_counter); the first `--warmup` steps are left out of
the statistics and the very first step is reported alone (`first_step_ms`: kernel selection, optimizer state
allocation).  Peak memory is torch.cuda.max_memory_allocated / max_memory_reserved over the timed steps
(weights included).  MFU uses bench/dit_step.py's FLOP count of a frozen-base LoRA step,
2 × linear + 3 × attention forward FLOPs (LoRA's own rank-r matmuls and gradient-checkpointing recompute are
not counted; `hfu` adds the recomputed forward), against dit_step.peak_tflops (dense bf16/fp16 peak).

Cases: `--table` runs the standard table (TABLE) and then the peers' shapes (PEERS, issue 18: LoKr factor 8 at
batch 8, full-matrix and decomposed; rank-32 LoRA at batch 1 on 1024×1024 and 832×1216), each case once;
`--peers` runs PEERS alone.  `--set key=value` (repeatable) sets a TrainConfig field, or `network_args.key=value`
one network argument, in every case (values parsed as JSON where they parse: true, 8, "auto", {...}), so any lever
can be measured without editing this file.  Each row records which levers were on as the loop's setup left
them (`levers_on`: compiled blocks read from the DiT, the attention kernel chosen, fused q/k/v layers packed,
fp8 storage, checkpointing, block swap), and every speed/memory setting of the case's config (`speed_settings`).

With `--preservation_loss_weight W` (> 0) every step also carries the differential output preservation term as
the loop adds it (train/flow.py `Preservation`: the DiT at the step's x_σ, σ on 16 preservation contexts, once
with the network's multiplier at 0 without gradient, once with it on): the cost of that option per step.

Usage:  python bench/train_step.py --config 2b --resolution 1024 --batch 1 [--grad_ckpt] [--steps 20 --warmup 3]
        python bench/train_step.py --resolution 832x1216 --set compile_blocks=true --set fuse_qkv=false
        python bench/train_step.py --table --json-out out/train_step.json      # table + peers' shapes, one process
        python bench/train_step.py --config tiny --resolution 128 --batch 1 --steps 2 --warmup 1   # CPU smoke
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from anima_trainer.config import TrainConfig
from anima_trainer.config.speed_memory_settings import SpeedMemorySettings
from anima_trainer.dtypes import PRECISION_DTYPES, PRECISIONS
from anima_trainer.models.compile import image_tokens, is_compiled
from anima_trainer.models.dit import AnimaDiT
from anima_trainer.models.fp8 import has_fp8
from anima_trainer.models.layers import QKNormAttentionBase
from anima_trainer.train.flow import Preservation, sample_seed, training_step
from anima_trainer.train.model_setup import WEIGHT_DTYPES, prepare_dit
from anima_trainer.train.setup import setup_optimization
from anima_trainer.train.step_time import forward_flops

try:  # run as a script: bench/ is sys.path[0]
    from dit_step import CONFIGS, CONTEXT_ROWS, peak_tflops
except ImportError:  # imported as bench.train_step from the repository root
    from bench.dit_step import CONFIGS, CONTEXT_ROWS, peak_tflops

REPO = Path(__file__).resolve().parent.parent
# (resolution, batch, gradient checkpointing): the standard table, run in this order by --table
TABLE = [(1024, 1, False), (1024, 1, True), (1024, 4, False), (1024, 4, True), (512, 4, False)]
# --levers: the issue-7 levers on top of the defaults, (resolution, batch, checkpointing, TrainConfig overrides)
# (compile_blocks defaults to "auto": compiled on CUDA sm80+ with triton, so the eager rows say so)
LEVERS = [
    (1024, 1, False, {"fuse_qkv": False, "attention_backend": "math", "compile_blocks": False}),  # the old path
    (1024, 1, False, {"compile_blocks": False}),  # eager with the other defaults
    (1024, 1, False, {"compile_blocks": True}),
    (1024, 1, True, {"checkpoint_mode": "selective"}),
    (1024, 1, True, {"compile_blocks": True}),
    (1024, 4, False, {"compile_blocks": True}),
    (1024, 1, True, {"blocks_to_swap": 26}),
    (1024, 1, False, {"fp8_base": True}),
]
# --table then runs the peers' published shapes (issue 18 item 3, docs in bench/README.md), same code and card:
# a LoKr trainer's batch 8 @ 1024² (factor 8; full-matrix = both Kronecker factors full, decomposed = w2 as a
# rank --rank product, networks/lokr.py), with checkpointing (batch 8 without it needs ~110 GiB), and the LoRA
# trainers' batch 1 @ ~1 MP, rank 32, square and 832×1216 (width × height).
LOKR_F8 = {"network_module": "lokr", "network_args": {"factor": "8"}}  # network_args are strings, as in a TOML list
PEERS = [
    (1024, 8, True, {**LOKR_F8, "network_args": {"factor": "8", "full_matrix": "true"}}),
    (1024, 8, True, LOKR_F8),
    (1024, 1, False, {}),
    ((832, 1216), 1, False, {}),
]
MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}  # TrainConfig.mixed_precision per dtype
OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


def git_commit() -> dict:
    """{"commit": short hash or None, "dirty": bool or None}; ANIMA_BENCH_COMMIT overrides (a copy of the
    tree without .git, e.g. on a lent GPU machine)."""
    if os.environ.get("ANIMA_BENCH_COMMIT"):
        return {"commit": os.environ["ANIMA_BENCH_COMMIT"], "dirty": None}
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {"commit": head or None, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment(device: torch.device) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        **git_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": sys.version.split()[0],
    }


def parse_resolution(text: str | int) -> tuple[int, int]:
    """`1024` (square) or `832x1216` (width × height) → (width, height) in pixels."""
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        width, height = (int(parts[0]),) * 2 if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution {text!r}: expected a side (1024) or width x height "
                                         "(832x1216)") from None
    if len(parts) > 2 or width < 16 or height < 16:
        raise argparse.ArgumentTypeError(f"resolution {text!r}: expected a side (1024) or width x height "
                                         "(832x1216), each >= 16")
    return width, height


def resolution_label(width: int, height: int) -> int | str:
    """What a row records: the side of a square, else "WxH"."""
    return width if width == height else f"{width}x{height}"


def parse_setting(text: str) -> tuple[str, object]:
    """`key=value` of --set: the value as JSON where it parses (true, 8, 0.5, null, {...}), else the string;
    a network argument (`network_args.NAME=value`) stays a string, as network_args holds them."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected key=value")
    name = key.split(".", 1)[0]
    if name not in TrainConfig.model_fields or ("." in key and name != "network_args"):
        raise argparse.ArgumentTypeError(f"--set {key}: not a TrainConfig field (network_args.<name> sets one "
                                         "network argument)")
    if name == "network_args" and "." in key:
        return key, raw.strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = {"True": True, "False": False, "None": None}.get(raw.strip(), raw.strip())
    return key, value


def apply_settings(levers: dict, settings: list[tuple[str, object]]) -> dict:
    """A case's levers with --set applied on top (network_args.<name> merges into the case's network_args)."""
    out = dict(levers)
    for key, value in settings:
        if key.startswith("network_args."):
            out["network_args"] = {**out.get("network_args", {}), key.split(".", 1)[1]: value}
        else:
            out[key] = value
    return out


def train_config(args: argparse.Namespace, dtype_name: str, grad_ckpt: bool, **levers) -> TrainConfig:
    """A validated TrainConfig with the loop's defaults (timestep sampling, loss, clipping, AdamW, constant
    lr), the case's levers on top; the model/data paths are placeholders that the step never reads."""
    unused = Path("unused-by-bench")
    fields = dict(pretrained_model_name_or_path=unused / "dit.safetensors", qwen3=unused / "qwen3.safetensors",
                  vae=unused / "vae.safetensors", output_dir=unused, dataset_config=unused / "dataset.toml",
                  network_module="lora", network_dim=args.rank,
                  network_alpha=float(args.alpha if args.alpha is not None else args.rank),
                  learning_rate=args.lr, mixed_precision=MIXED_PRECISION[dtype_name],
                  gradient_checkpointing=grad_ckpt, max_train_steps=args.warmup + args.steps, seed=args.seed)
    return TrainConfig(**{**fields, **levers})


def levers_on(cfg: TrainConfig, dit: AnimaDiT, kernel: object) -> dict:
    """Which speed and memory levers the case ran with, read from the prepared DiT where it can tell (not from
    the config's defaults, which may be "auto")."""
    attentions = [m for name, m in dit.named_modules()
                  if isinstance(m, QKNormAttentionBase) and name.endswith(".self_attn")]
    runner = getattr(dit, "runner", None)
    return {"compiled": is_compiled(dit), "attention_kernel": kernel,
            "fused_qkv": sum(bool(m.fuse_qkv and m.check_qkv_packed()) for m in attentions),
            "self_attention_layers": len(attentions), "fp8_base": has_fp8(dit),
            "gradient_checkpointing": bool(getattr(runner, "gradient_checkpointing", cfg.gradient_checkpointing)),
            "blocks_to_swap": len(runner.swapper.swapped) if getattr(runner, "swapper", None) else 0}


def speed_settings(cfg: TrainConfig) -> dict:
    """Every speed/memory field of the case's config (config/speed_memory_settings.py) as set."""
    return {k: getattr(cfg, k) for k in SpeedMemorySettings.model_fields if k != "max_data_loader_n_workers"}


def build_dit(name: str, device: torch.device, dtype: torch.dtype) -> AnimaDiT:
    """Random (default-initialised) weights built directly on the device, cast, frozen."""
    with torch.device(device):
        dit = AnimaDiT(CONFIGS[name])
    return dit.to(dtype).requires_grad_(False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(args: argparse.Namespace, device: torch.device, dtype_name: str, resolution: int | tuple[int, int],
               batch: int, grad_ckpt: bool, levers: dict | None = None) -> dict:
    """Set up one (resolution, batch, checkpointing, levers) case exactly as `run_training` does
    (`prepare_dit`: fused q/k/v, memory options, network, attention kernel, compile) and time its steps."""
    dtype = PRECISION_DTYPES[dtype_name]
    levers = dict(levers or {})
    cfg = train_config(args, dtype_name, grad_ckpt, **levers)
    assert WEIGHT_DTYPES[cfg.mixed_precision] == dtype
    torch.manual_seed(args.seed)
    dit = build_dit(args.config, torch.device("cpu") if cfg.blocks_to_swap else device, dtype)
    c = dit.config
    width, height = to_size(resolution)
    network, kernel = prepare_dit(cfg, dit, device, dtype, tokens={image_tokens(width, height)}, batch=batch)
    on = levers_on(cfg, dit, kernel)
    optim = setup_optimization(cfg, network, device, dtype, cfg.max_train_steps)
    optimizer, scheduler, scaler = optim.optimizer, optim.scheduler, optim.scaler
    params = network.trainable_parameters()

    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    latents = torch.randn(batch, c.in_channels, 1, height // 8, width // 8, generator=gen).to(device)  # fp32, cached
    context = torch.randn(batch, CONTEXT_ROWS, c.crossattn_dim, generator=gen).to(device, dtype)
    preservation = None
    if cfg.preservation_loss_weight:  # 16 prompts' contexts, as the built-in bank encoded once at start-up
        contexts = torch.randn(16, CONTEXT_ROWS, c.crossattn_dim, generator=gen).to(device, dtype)
        preservation = Preservation(dit, network, contexts, cfg.preservation_loss_weight,
                                    cfg.preservation_every_n_steps, args.seed)

    steps = iter(range(args.warmup + args.steps))

    def step() -> float:
        index = next(steps)
        seeds = [sample_seed(args.seed, index, i, 0) for i in range(batch)]  # as the loop: epoch, item
        extra = None if preservation is None else preservation.for_step(index + 1, 0)
        loss = training_step(dit, latents, context, cfg, seeds, extra_loss=extra)
        scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
        scaler.unscale_(optimizer)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    cuda = device.type == "cuda"
    _sync(device)
    if cuda:
        setup_gib = torch.cuda.memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    ms, wall_ms, losses = [], [], []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step())  # ends in loss.item(): the step is complete on the device
            end.record()
            end.synchronize()
            ms.append(start.elapsed_time(end))
        else:
            losses.append(step())
        wall_ms.append((time.perf_counter() - t0) * 1000)
        if not cuda:
            ms.append(wall_ms[-1])
    timed = ms[args.warmup:] or ms
    median = statistics.median(timed)

    tokens = math.ceil(height // 8 / c.patch_spatial) * math.ceil(width // 8 / c.patch_spatial)
    f = forward_flops(c, tokens, CONTEXT_ROWS)
    model_flop = (2 * f["linear"] + 3 * f["attention"]) * batch  # frozen-base LoRA step (dit_step.py)
    hw_flop = model_flop + (f["linear"] + f["attention"]) * batch * grad_ckpt  # + the recomputed forward
    peak = peak_tflops(device) if dtype != torch.float32 else None  # dense bf16/fp16 peak only
    achieved = model_flop / (median / 1000) / 1e12
    row = {
        "config": args.config, "blocks": c.num_blocks, "width": c.model_channels,
        "resolution": resolution_label(width, height), "image_width": width, "image_height": height,
        "batch": batch, "tokens": tokens, "grad_ckpt": grad_ckpt, "levers": levers, "attention_kernel": kernel,
        "levers_on": on, "speed_settings": speed_settings(cfg), "network_module": cfg.network_module,
        "network_args": dict(cfg.network_args), "rank": cfg.network_dim,
        "alpha": cfg.network_alpha, "dtype": dtype_name, "optimizer": type(optimizer).__name__,
        "fused_adamw": bool(optimizer.defaults.get("fused")), "lora_modules": len(network.modules_by_name),
        "lora_params": sum(p.numel() for p in params), "steps": args.steps, "warmup": args.warmup,
        "first_step_ms": round(ms[0], 2), "ms_per_step_median": round(median, 2),
        "ms_per_step_mean": round(statistics.fmean(timed), 2), "ms_per_step_min": round(min(timed), 2),
        "ms_per_step_max": round(max(timed), 2), "wall_ms_per_step_median": round(statistics.median(
            wall_ms[args.warmup:] or wall_ms), 2), "samples_per_s": round(batch / (median / 1000), 3),
        "loss_first": losses[0], "loss_last": losses[-1], "loss_finite": all(math.isfinite(x) for x in losses),
        "setup_memory_gib": round(setup_gib, 2) if cuda else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2) if cuda else None,
        "tflop_per_step": round(model_flop / 1e12, 4), "achieved_tflops": round(achieved, 2),
        "peak_tflops": peak, "mfu": round(achieved / peak, 4) if peak else None,
        "hfu": round(hw_flop / (median / 1000) / 1e12 / peak, 4) if peak else None, "oom": False,
    }
    network.remove()
    return row


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(args: argparse.Namespace, device: torch.device, dtype_name: str, resolution: int | tuple[int, int],
            batch: int, grad_ckpt: bool, catch_oom: bool, levers: dict | None = None) -> dict:
    """One case; with `catch_oom` a CUDA OOM (or, in a table, any error of a lever) becomes {"oom"/"error": …}
    and the memory is freed for the next."""
    case = {"config": args.config, "resolution": resolution_label(*to_size(resolution)), "batch": batch,
            "grad_ckpt": grad_ckpt, "rank": args.rank, "dtype": dtype_name, "levers": levers or {}}
    try:
        row = run_config(args, device, dtype_name, resolution, batch, grad_ckpt, levers)
    except OOM_ERRORS as e:
        if not catch_oom:
            raise
        row = {**case, "oom": True, "error": str(e).strip().splitlines()[0][:300] if str(e).strip() else "OOM"}
    except Exception as e:  # a lever that fails on this machine is a result, not the end
        if not catch_oom:
            raise
        row = {**case, "oom": False, "failed": True, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    free_memory(device)  # the failed frames are gone with the except block: their tensors can be freed now
    return row


def _compact(value: object) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={_compact(v)}" for k, v in value.items())
    return str(value)


def config_label(r: dict) -> str:
    """One table cell: shape, network, dtype, the case's levers, and [the levers that were on]."""
    levers = dict(r.get("levers") or {})
    module = levers.pop("network_module", "lora")
    args = levers.pop("network_args", None)
    network = f"r{r['rank']}" if module == "lora" else f"{module} r{r['rank']}"
    if args:
        network += f" {_compact(args)}"
    extra = " ".join(f"{k}={_compact(v)}" for k, v in levers.items())
    on = r.get("levers_on")
    ran = ""
    if on:
        parts = ["compiled" if on["compiled"] else "eager", f"attn {on['attention_kernel']}",
                 f"fused qkv {on['fused_qkv']}/{on['self_attention_layers']}"]
        parts += ["fp8 base"] * bool(on["fp8_base"]) + [f"swap {on['blocks_to_swap']}"] * bool(on["blocks_to_swap"])
        ran = f" [{', '.join(parts)}]"
    return (f"{r['config']} {r['resolution']}px b{r['batch']} ckpt {'on' if r['grad_ckpt'] else 'off'} "
            f"{network} {r['dtype']}{' ' + extra if extra else ''}{ran}")


def markdown_table(env: dict, rows: list[dict]) -> str:
    """The README's Results columns, one line per case (OOM cases say so)."""
    def fmt(v, spec: str = "") -> str:
        return "–" if v is None else format(v, spec)

    commit = f"{env['commit']}{'+dirty' if env.get('dirty') else ''}" if env["commit"] else "?"
    lines = ["| date | commit | device | torch | config | ms/step | peak GiB | MFU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("oom"):
            ms, mem, mfu = "OOM", "OOM", "–"
        elif r.get("failed"):
            ms, mem, mfu = "failed", "–", "–"
        else:
            ms = fmt(r["ms_per_step_median"], ".1f")
            mem = fmt(r["peak_memory_gib"], ".2f")
            mfu = "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {env['date']} | {commit} | {env['device']} | {env['torch']} | {config_label(r)} | {ms} "
                     f"| {mem} | {mfu} |")
    return "\n".join(lines)


def write_json(path: str | None, env: dict, rows: list[dict], args: argparse.Namespace) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".part")
    tmp.write_text(json.dumps({"meta": {**env, "argv": sys.argv[1:], "args": vars(args)}, "results": rows},
                              indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="2b", help="DiT size (dit_step.CONFIGS)")
    p.add_argument("--resolution", type=parse_resolution, default=(1024, 1024),
                   help="image side in pixels (1024), or width x height (832x1216); latent = /8")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (network_dim)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank)")
    p.add_argument("--grad_ckpt", action="store_true", help="dit.gradient_checkpointing = True")
    p.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one is reported alone)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=PRECISIONS, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write {meta, results} here (after every "
                                                                     "case, so a cut-off run keeps what it measured)")
    p.add_argument("--table", action="store_true",
                   help="run the standard table " + ", ".join(f"({r},{b},{'on' if g else 'off'})" for r, b, g in TABLE)
                        + ", then the peers' shapes (PEERS), for --config in one process (--resolution/--batch/"
                          "--grad_ckpt ignored), CUDA OOMs recorded, and print a markdown table at the end")
    p.add_argument("--peers", action="store_true", help="run the peers' shapes (PEERS; --table includes them)")
    p.add_argument("--cases", type=parse_groups, default=[], metavar="GROUPS",
                   help="comma list of case groups to run, in the order table, peers, levers (e.g. --cases table: "
                        "the standard table without the peers)")
    p.add_argument("--levers", action="store_true", help="also run the lever cases (LEVERS) after the table")
    p.add_argument("--set", dest="settings", action="append", type=parse_setting, default=[], metavar="KEY=VALUE",
                   help="set a TrainConfig field (or network_args.NAME) in every case; repeatable")
    p.add_argument("--preservation_loss_weight", type=float, default=0.0,
                   help="> 0: every step also carries the differential output preservation term (its cost per step)")
    args = p.parse_args(argv)
    if args.preservation_loss_weight < 0:
        p.error("need --preservation_loss_weight >= 0")
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.rank < 1:
        p.error("need --steps >= 1, --warmup >= 0, --batch >= 1, --rank >= 1")
    return args


CASE_GROUPS = ("table", "peers", "levers")


def case_groups(args: argparse.Namespace) -> set[str]:
    """The case groups to run: --cases, plus --table (table and peers), --peers, --levers."""
    groups = set(args.cases)
    groups |= {"table", "peers"} if args.table else set()
    groups |= {"peers"} if args.peers else set()
    groups |= {"levers"} if args.levers else set()
    return groups


def parse_groups(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in CASE_GROUPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"--cases {text!r}: unknown {unknown}; choose from {', '.join(CASE_GROUPS)}")
    return names


def to_size(resolution: int | str | tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a case's resolution (an int side, "WxH", or the tuple itself)."""
    return resolution if isinstance(resolution, tuple) else parse_resolution(resolution)


def unique_cases(cases: list[tuple]) -> list[tuple]:
    """The cases in order, each once (a peer shape the table already has runs once)."""
    seen, out = set(), []
    for r, b, g, lv in cases:
        key = (to_size(r), b, g, json.dumps(lv, sort_keys=True, default=str))
        if key not in seen:
            seen.add(key)
            out.append((r, b, g, lv))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    env = environment(device)
    # the preservation term: a TrainConfig option (DiT-only training, which it needs) in the case's levers
    dop = {"preservation_loss_weight": args.preservation_loss_weight,
           "network_train_unet_only": True} if args.preservation_loss_weight > 0 else {}
    groups = case_groups(args)
    cases = [(r, b, g, dict(dop)) for r, b, g in TABLE] if "table" in groups else []
    if "peers" in groups:
        cases += [(r, b, g, {**dop, **lv}) for r, b, g, lv in PEERS]
    if not cases:
        cases = [(args.resolution, args.batch, args.grad_ckpt, dict(dop))]
    if "levers" in groups:
        cases += LEVERS
    cases = unique_cases([(r, b, g, apply_settings(lv, args.settings)) for r, b, g, lv in cases])
    several = bool(groups)
    rows = []
    for resolution, batch, grad_ckpt, levers in cases:
        print(f"[train_step] {args.config} {resolution_label(*to_size(resolution))}px batch {batch} grad_ckpt "
              f"{grad_ckpt} rank {args.rank} {dtype_name} {levers} on {env['device']}", file=sys.stderr, flush=True)
        row = {**env, **measure(args, device, dtype_name, resolution, batch, grad_ckpt,
                                catch_oom=several, levers=levers)}
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        write_json(args.json_out, env, rows, args)
    if several:
        print(markdown_table(env, rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
