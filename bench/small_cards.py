"""Benchmark: `vram_budget_gb` plans for small cards, measured on a big card with the allocator capped → JSON.

Issue 18 item 4.  For each budget (default 8, 12, 16, 24 GiB) the planner (`train.vram_plan.plan_memory`) picks
the memory settings for one step of --config at --resolution × --batch (rank --rank LoRA, DiT only, latents and
text-encoder outputs cached: what the bench feeds the step, and what a small-card run should do).  Then, in a
fresh subprocess per budget (a cap never leaks into the next case), the process is capped with
`torch.cuda.set_per_process_memory_fraction(budget / card)` and bench/train_step.py's step (the training loop's
own) runs with the plan's settings.  Recorded per budget: the plan, its estimated peak and expected ms/step (the
planner's H200 cost model, train/step_time.py), the measured peak (max_memory_allocated and _reserved), the
measured ms/step, and the ratio to the unconstrained step (same card, same levers, no budget and no cap: run first,
in its own subprocess).  Target (issue 18): 1024² × 1 rank 32 fits 8 GiB at ≤ 2× the unconstrained time.

The cap bounds PyTorch's caching allocator, not the CUDA context (~0.5 GiB outside it) or other processes: a
real card of that size has the context inside its memory, which the planner's 1 GiB reserve covers.

    python bench/small_cards.py --json-out out/small_cards.json                 # GPU: 2b, 1024², the four budgets
    python bench/small_cards.py --plan-only                                     # any machine: the plans only
    python bench/small_cards.py --config tiny --resolution 128 --budgets 8 --steps 1 --warmup 0   # CPU smoke
On the CPU no cap is applied (the rows say `cap_fraction: null`): the smoke run checks the plumbing only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from anima_trainer.config import ConfigError
from anima_trainer.train.vram_plan import plan_memory

try:  # run as a script: bench/ is sys.path[0]
    import train_step
except ImportError:  # imported as bench.small_cards from the repository root
    from bench import train_step

BUDGETS = (8.0, 12.0, 16.0, 24.0)
# what the bench's step is: cached latents and contexts, the DiT trained alone (no text encoder, no VAE on the card)
CACHED_RUN = {"network_train_unet_only": True, "cache_latents": True, "cache_text_encoder_outputs": True}
TARGET = (8.0, 2.0)  # issue 18: 8 GiB at <= 2x the unconstrained step


def step_args(args: argparse.Namespace) -> argparse.Namespace:
    """train_step's arguments for one case of this run."""
    argv = ["--config", args.config, "--rank", str(args.rank), "--steps", str(args.steps), "--warmup",
            str(args.warmup), "--seed", str(args.seed)]
    return train_step.parse_args(argv)


def plan_for(args: argparse.Namespace, budget: float, device: torch.device, dtype_name: str):
    """The planner's choice for `budget` GiB (ConfigError when nothing fits)."""
    width, height = args.resolution
    levers = train_step.apply_settings(dict(CACHED_RUN), args.settings)
    cfg = train_step.train_config(step_args(args), dtype_name, False, **levers)
    return plan_memory(cfg, train_step.CONFIGS[args.config], resolution=(height, width), batch=args.batch,
                       budget_gib=budget, llm_adapter_trained=False, device=device)


def plan_row(args: argparse.Namespace, budget: float, device: torch.device, dtype_name: str) -> dict:
    try:
        plan = plan_for(args, budget, device, dtype_name)
    except ConfigError as e:
        return {"budget_gib": budget, "plan": None, "error": str(e)}
    settings = {k: v for k, v in plan.settings.items() if k != "cache_llm_adapter_outputs"}
    return {"budget_gib": budget, "plan": settings, "plan_candidate": plan.table[plan.chosen][0],
            "estimated_peak_gib": round(plan.estimate_gib, 2), "expected_ms_h200": round(plan.expected_ms, 1),
            "expected_compiled": plan.compiled[plan.chosen], "plan_text": plan.describe()}


def worker(args: argparse.Namespace, budget: float | None) -> dict:
    """One case in this process: the plan's settings (None: unconstrained, no plan), capped on CUDA, measured."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    row: dict = {"budget_gib": budget, "cap_fraction": None}
    settings: dict = {}
    if budget is not None:
        row = {**plan_row(args, budget, device, dtype_name), "cap_fraction": None}
        if row["plan"] is None:
            return row
        settings = dict(row["plan"])
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            row["cap_fraction"] = round(min(1.0, budget * 2**30 / total), 4)
            torch.cuda.set_per_process_memory_fraction(row["cap_fraction"], device)
    grad_ckpt = bool(settings.pop("gradient_checkpointing", False))
    levers = train_step.apply_settings({**CACHED_RUN, **settings}, args.settings)
    measured = train_step.measure(step_args(args), device, dtype_name, args.resolution, args.batch, grad_ckpt,
                                  catch_oom=True, levers=levers)
    return {**row, "measured": measured}


def run_case(args: argparse.Namespace, budget: float | None, argv: list[str]) -> dict:
    """`worker` in a fresh python (the cap is per process); a crash or timeout is a result too."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker",
               "none" if budget is None else str(budget), "--json-out", str(out)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(train_step.REPO / "src"),
                                                                         os.environ.get("PYTHONPATH")]))}
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"budget_gib": budget, "failed": True, "error": f"timed out after {args.case_timeout} s"}
        sys.stderr.write(done.stderr[-4000:])
        if done.returncode or not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return {"budget_gib": budget, "failed": True, "error": f"exit {done.returncode}: {' | '.join(tail)}"}
        return json.loads(out.read_text(encoding="utf-8"))


def summarise(rows: list[dict], baseline: dict | None) -> None:
    """Add ratio_to_unconstrained, fits_budget and (for 8 GiB) the issue's target check to each row."""
    base = (baseline or {}).get("measured") or {}
    base_ms = base.get("ms_per_step_median")
    for r in rows:
        m = r.get("measured") or {}
        ms = m.get("ms_per_step_median")
        r["ratio_to_unconstrained"] = round(ms / base_ms, 3) if ms and base_ms else None
        reserved = m.get("peak_reserved_gib")
        r["fits_budget"] = None if reserved is None else reserved <= r["budget_gib"]
        if r["budget_gib"] == TARGET[0]:  # None: not measurable here (no memory numbers, or no step)
            ratio = r["ratio_to_unconstrained"]
            r["target_8gib_2x"] = (None if ratio is None or r["fits_budget"] is None
                                   else ratio <= TARGET[1] and r["fits_budget"])


def markdown_table(env: dict, rows: list[dict], baseline: dict | None) -> str:
    def cell(v, spec: str = "") -> str:
        return "–" if v is None else format(v, spec)

    lines = [f"card {env['device']}, torch {env['torch']}, commit {env.get('commit') or '?'}, {env['date']}",
             "| budget GiB | plan | est. peak GiB | peak GiB (reserved) | expected ms (H200 est.) | ms/step "
             "| × unconstrained |", "| --- | --- | --- | --- | --- | --- | --- |"]
    base = (baseline or {}).get("measured") or {}
    if base:
        lines.append(f"| none | unconstrained | – | {cell(base.get('peak_memory_gib'), '.2f')} "
                     f"({cell(base.get('peak_reserved_gib'), '.2f')}) | – | "
                     f"{cell(base.get('ms_per_step_median'), '.1f')} | 1.00 |")
    for r in rows:
        m = r.get("measured") or {}
        if r.get("failed") or m.get("failed") or m.get("oom"):
            ms = "OOM" if m.get("oom") else "failed"
        else:
            ms = cell(m.get("ms_per_step_median"), ".1f")
        lines.append(f"| {r['budget_gib']:g} | {r.get('plan_candidate') or r.get('error', '–')} "
                     f"| {cell(r.get('estimated_peak_gib'), '.2f')} | {cell(m.get('peak_memory_gib'), '.2f')} "
                     f"({cell(m.get('peak_reserved_gib'), '.2f')}) | {cell(r.get('expected_ms_h200'), '.0f')} "
                     f"| {ms} | {cell(r.get('ratio_to_unconstrained'), '.2f')} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS), help="GiB (default 8 12 16 24)")
    p.add_argument("--config", choices=sorted(train_step.CONFIGS), default="2b")
    p.add_argument("--resolution", type=train_step.parse_resolution, default=(1024, 1024),
                   help="side (1024) or width x height (832x1216)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="timed steps per budget")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile, kernel choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=sorted(train_step.MIXED_PRECISION), default=None)
    p.add_argument("--set", dest="settings", action="append", type=train_step.parse_setting, default=[],
                   metavar="KEY=VALUE", help="a TrainConfig field in every case (train_step.py --set)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--plan-only", action="store_true", help="print the plans; run nothing, cap nothing")
    p.add_argument("--case-timeout", type=float, default=170.0, help="seconds per budget's subprocess")
    p.add_argument("--json-out", default=None, metavar="FILE")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one case in this process: a budget or none
    return p.parse_args(argv)


def forwarded(argv: list[str]) -> list[str]:
    """The parent's arguments a worker gets (everything but the outputs and the mode)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--json-out", "--worker"):
            skip = True
            continue
        if a == "--plan-only" or a.startswith(("--json-out=", "--worker=")):
            continue
        out.append(a)
    return out


def write(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker is not None:  # a subprocess of the run below
        row = worker(args, None if args.worker == "none" else float(args.worker))
        write(args.json_out, row)
        return row
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # plans are for a GPU run: bf16 unless asked (a CPU run, which measures, uses fp32 as train_step does)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" or args.plan_only else "fp32")
    env = train_step.environment(device)
    meta = {**env, "argv": argv, "config": args.config, "resolution": train_step.resolution_label(*args.resolution),
            "batch": args.batch, "rank": args.rank}
    if args.plan_only:
        rows = [plan_row(args, b, device, dtype_name) for b in args.budgets]
        for r in rows:
            print(r.get("plan_text") or f"vram_budget_gb {r['budget_gib']:g}: {r['error']}", flush=True)
        result = {"meta": meta, "baseline": None, "results": rows}
        write(args.json_out, result)
        return result
    child = forwarded(argv)
    baseline = run_case(args, None, child)
    print(json.dumps({"baseline": baseline}, default=str), flush=True)
    rows: list[dict] = []
    for budget in args.budgets:
        rows.append(run_case(args, budget, child))
        summarise(rows, baseline)
        print(json.dumps(rows[-1], default=str), flush=True)
        write(args.json_out, {"meta": meta, "baseline": baseline, "results": rows})
    print(markdown_table(env, rows, baseline), flush=True)
    result = {"meta": meta, "baseline": baseline, "results": rows}
    write(args.json_out, result)
    return result


if __name__ == "__main__":
    main()
