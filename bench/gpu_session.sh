#!/usr/bin/env bash
# One prepared session for a lent H100/H200 (a 10-minute slot): set up, print the GPU, run the train-step
# table (bench/train_step.py --table) and the demo end-to-end on the GPU.  Each section reports its exit
# status; the script always ends well inside 600 s (DEADLINE) and exits non-zero if any section failed.
#
# Run from the repository root of the GPU machine's copy, with the wheels in .whl/ carried (bench/README.md):
#     ANIMA_BENCH_COMMIT=<short hash> bash bench/gpu_session.sh
# Results and logs land in $OUT (default /tmp/anima-gpu-session), at most 8 files:
#     session.log  status.txt  train_step.json  train_step.log  demo.log  demo_sample_before.png  demo_sample_after.png
#
# The machine's image has no network and no venv for this repo; its `python3` holds torch with CUDA and most
# of our dependencies, but (as listed in 2026-11) not pydantic or diffusers: those come from .whl/ (installed
# with --target, nothing downloaded).  The package itself is used from src/ via PYTHONPATH (no install).
# Without a CUDA torch in any python, the fallback is a venv with --system-site-packages and `pip install -e .`
# (which needs a registry for whatever is missing).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
OUT=${OUT:-/tmp/anima-gpu-session}
mkdir -p "$OUT"
DEADLINE=${DEADLINE:-560}      # seconds after start by which everything has ended
BENCH_LIMIT=${BENCH_LIMIT:-420} # the --table run (the 2B table takes ~1-2 min on an H100)
DEMO_LIMIT=${DEMO_LIMIT:-150}
DEMO_DIR=${DEMO_DIR:-/tmp/anima-demo}
SITE=/tmp/anima-site
# for a dry run on a CPU machine: REQUIRE_CUDA=0 BENCH_ARGS="--config tiny --resolution 128 --steps 2 --warmup 1"
REQUIRE_CUDA=${REQUIRE_CUDA:-1}
BENCH_ARGS=${BENCH_ARGS:---table}
DEMO_ARGS=${DEMO_ARGS:-}
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5 HF_HUB_OFFLINE=1 REQUIRE_CUDA

report() {  # report NAME RC
    echo "=== section $1: exit $2 (t=${SECONDS}s) ==="
    echo "$1 $2" >>"$OUT/status.txt"
}

remaining() { echo $((DEADLINE - SECONDS)); }

session() {
    set -x
    : >"$OUT/status.txt"

    # --- 1. machine and GPU --------------------------------------------------------------------------------
    uname -a; nproc; free -g; df -h /tmp | tail -1
    nvidia-smi
    report nvidia-smi $?
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu \
        --format=csv

    # --- 2. python with torch + CUDA --------------------------------------------------------------------------
    PY=""
    for cand in ${PYTHON:-} python3 /opt/torch/.venv/bin/python3 python; do
        if command -v "$cand" >/dev/null 2>&1 &&
            timeout 120 "$cand" -c 'import sys, torch; print(sys.executable, torch.__version__, torch.version.cuda,
torch.cuda.is_available() and torch.cuda.get_device_name(0))
sys.exit(0 if torch.cuda.is_available() or sys.argv[1] == "0" else 1)' "$REQUIRE_CUDA"; then
            PY=$(command -v "$cand"); break
        fi
    done
    if [ -z "$PY" ]; then  # fallback: a venv that reuses any system torch, then the package with its deps
        echo "no python with a CUDA torch found: trying a venv with pip install -e ."
        base=$(command -v python3 || command -v python)
        timeout 300 "$base" -m venv --system-site-packages /tmp/anima-venv &&
            timeout 300 /tmp/anima-venv/bin/python -m pip install -q --retries 0 --timeout 10 -e . &&
            /tmp/anima-venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' &&
            PY=/tmp/anima-venv/bin/python
    fi
    [ -n "$PY" ]; report python $?
    [ -n "$PY" ] || return 1

    # --- 3. our dependencies (carried wheels for what the image lacks) and the package from src/ --------------
    export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
    check='import pydantic, diffusers, transformers, tokenizers, safetensors, accelerate, PIL, tqdm, numpy, anima_trainer.train.loop, anima_trainer.cli'
    if ! "$PY" -c "$check"; then
        if ls .whl/*.whl >/dev/null 2>&1; then
            ls -la .whl
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
            echo "wheel install: exit $?"
            export PYTHONPATH="$ROOT/src:$SITE${PYTHONPATH#"$ROOT/src"}"
        fi
        if ! "$PY" -c "$check"; then  # last resort: the registry (fails fast without a network)
            timeout 120 "$PY" -m pip install -q --retries 0 --timeout 10 -e .
            echo "pip install -e .: exit $?"
        fi
    fi
    "$PY" -c "$check"' ; import torch, pydantic, diffusers, transformers; print("torch", torch.__version__, "pydantic",
pydantic.VERSION, "diffusers", diffusers.__version__, "transformers", transformers.__version__)'
    rc=$?; report deps $rc
    [ $rc -eq 0 ] || return 1
    git rev-parse --short HEAD 2>/dev/null || echo "no git here; commit from ANIMA_BENCH_COMMIT=${ANIMA_BENCH_COMMIT:-unset}"

    # --- 4. the train-step table ----------------------------------------------------------------------------
    limit=$(( $(remaining) - 100 )); [ "$limit" -gt "$BENCH_LIMIT" ] && limit=$BENCH_LIMIT
    [ "$limit" -lt 60 ] && limit=60
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    timeout -k 15 "$limit" "$PY" bench/train_step.py $BENCH_ARGS --json-out "$OUT/train_step.json" 2>&1 |
        tee "$OUT/train_step.log"
    rc=${PIPESTATUS[0]}; [ "$rc" -eq 124 ] && echo "train_step: TIMED OUT after ${limit}s (partial results kept)"
    report train_step "$rc"

    # --- 5. the demo end-to-end (training on the GPU: the loop's Accelerator picks cuda) ---------------------
    limit=$(remaining); [ "$limit" -gt "$DEMO_LIMIT" ] && limit=$DEMO_LIMIT
    if [ "$limit" -lt 30 ]; then
        echo "demo: skipped, only ${limit}s left"; report demo skipped
    else
        rm -rf "$DEMO_DIR"
        timeout -k 10 "$limit" "$PY" -c '
import os, sys, torch
from anima_trainer.cli import main
rc = main(["demo", "--out", sys.argv[1], "--overwrite", *sys.argv[2:]])
cuda = torch.cuda.is_available()
peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
name = torch.cuda.get_device_name(0) if cuda else "no GPU"
print(f"demo: exit {rc}, CUDA peak {peak:.1f} MiB on {name}")
sys.exit(rc or (3 if peak == 0 and os.environ["REQUIRE_CUDA"] != "0" else 0))  # 3: training never used the GPU
' "$DEMO_DIR" $DEMO_ARGS 2>&1 | tee "$OUT/demo.log"
        rc=${PIPESTATUS[0]}; [ "$rc" -eq 124 ] && echo "demo: TIMED OUT after ${limit}s"
        for f in sample_before.png sample_after.png; do cp "$DEMO_DIR/$f" "$OUT/demo_$f" 2>/dev/null; done
        ls -la "$DEMO_DIR" "$DEMO_DIR/output" 2>/dev/null
        report demo "$rc"
    fi
    set +x
}

session 2>&1 | tee "$OUT/session.log"
set +x
echo "=== summary (t=${SECONDS}s) ==="
cat "$OUT/status.txt"
grep '^|' "$OUT/train_step.log" 2>/dev/null
ls -la "$OUT"
failed=$(awk '$2 != "0" {print $1}' "$OUT/status.txt" | tr '\n' ' ')
for s in nvidia-smi python deps train_step demo; do
    grep -q "^$s " "$OUT/status.txt" || failed="$failed$s(not reached) "
done
if [ -n "$failed" ]; then echo "FAILED: $failed"; exit 1; fi
echo "ALL SECTIONS OK"
