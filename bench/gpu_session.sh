#!/usr/bin/env bash
# One prepared session for a lent H100/H200 (one 600 s call): every measurement of issue 18, in priority order,
# each section under its own time limit and skipped (not failed) when its script is missing, so a session that
# is cut short still keeps what came first.  The script ends by DEADLINE (540 s) and exits non-zero if a section
# failed.  Sections:
#   nvidia-smi · python · deps · fused_qkv (issue 16's open decision) · targets (train_step --cases table) ·
#   peers (train_step --cases peers) · small_cards (vram_budget_gb plans, capped) · finetune_full and
#   finetune_blocks (issue 19: bench/finetune_levers.py's real peaks against train/finetune_memory.py's predictions,
#   the whole DiT and blocks 14-18 at 1024²) · fp8_compute · cache_build · profile (bench/profile_step.py
#   --compile) · demo (last; dropped when time is short)
#
# Run from the repository root of the GPU machine's copy, with the wheels in .whl/ carried (bench/README.md):
#     ANIMA_BENCH_COMMIT=<short hash> bash bench/gpu_session.sh
# Results and logs land in $OUT (default /tmp/anima-gpu-session): session.log, status.txt, <section>.log and
# <section>.json per measuring section (the JSON files are rewritten as results arrive: a timeout keeps them).
#
# Dry run on a CPU machine (REQUIRE_CUDA=0): every section runs at tiny size (or `--help` for the scripts whose
# tiny options this script does not know: profile_step), so the plumbing is tested; the
# demo is off there (DEMO=1 turns it on; it has its own tests):
#     REQUIRE_CUDA=0 PYTHON=.venv/bin/python OUT=/tmp/gs bash bench/gpu_session.sh
#
# The machine's image has no network and no venv for this repo; its `python3` holds torch with CUDA and most of
# our dependencies, but (as listed in 2026-11) not pydantic or diffusers: those come from .whl/ (installed with
# --target, nothing downloaded).  The package itself is used from src/ via PYTHONPATH (no install).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
OUT=${OUT:-/tmp/anima-gpu-session}
mkdir -p "$OUT"
DEADLINE=${DEADLINE:-540}   # seconds after start by which everything has ended
SITE=/tmp/anima-site
REQUIRE_CUDA=${REQUIRE_CUDA:-1}
DEMO_DIR=${DEMO_DIR:-/tmp/anima-demo}
if [ "$REQUIRE_CUDA" = 0 ]; then  # dry run: tiny sizes, the CPU
    DEV=cpu
    FUSED_ARGS=${FUSED_ARGS:---config tiny --tokens 64 --steps 1 --warmup 0 --threads 1}
    TARGET_ARGS=${TARGET_ARGS:---config tiny --resolution 64 --steps 1 --warmup 0}
    PEER_ARGS=${PEER_ARGS:---config tiny --resolution 48x80 --set network_module=lokr --set network_args.factor=8 --steps 1 --warmup 0}
    SMALL_ARGS=${SMALL_ARGS:---config tiny --resolution 64 --budgets 8 --steps 1 --warmup 0 --threads 1}
    # one case each: the per-parameter steps of the tiny DiT's 23 M parameters take ~15 s a case on 2 CPU cores
    FT_FULL_ARGS=${FT_FULL_ARGS:---config tiny --resolution 32 --steps 1 --warmup 0 --cases compensated_adafactor_fused}
    FT_BLOCKS_ARGS=${FT_BLOCKS_ARGS:---config tiny --resolution 32 --steps 1 --warmup 0 --patterns ^blocks\\.1\\. --cases compensated_adamw}
    FP8_ARGS=${FP8_ARGS:---config tiny --tokens 64 --batch 1 --steps 1 --warmup 0 --threads 1}
    CACHE_ARGS=${CACHE_ARGS:---tiny --images 2 --size 64 --batch 1 --workers 0 --budget-s 15 --threads 1}
    PROFILE_ARGS=${PROFILE_ARGS:---help}
    DEMO_ARGS=${DEMO_ARGS:---steps 2}
    DEMO=${DEMO:-0}  # off: on a shared CPU the demo's previews and evaluation take minutes (DEMO=1 runs it)
    L_DEMO=${L_DEMO:-300}
else
    DEV=cuda
    FUSED_ARGS=${FUSED_ARGS:-}
    # compile on explicitly (whatever the default is); rows record what actually ran (levers_on)
    TARGET_ARGS=${TARGET_ARGS:---cases table --steps 5 --warmup 2 --set compile_blocks=true}
    PEER_ARGS=${PEER_ARGS:---cases peers --steps 4 --warmup 2 --set compile_blocks=true}
    SMALL_ARGS=${SMALL_ARGS:---steps 4 --warmup 2 --case-timeout 75}
    # no AdamW8bit case: bitsandbytes is not among the carried wheels (FT_*_ARGS adds it where the image has it)
    FT_CASES="compensated_adamw compensated_adamw_fused compensated_adafactor compensated_adafactor_fused"
    FT_FULL_ARGS=${FT_FULL_ARGS:---resolution 1024 --steps 3 --warmup 1 --cases $FT_CASES}
    FT_BLOCKS_ARGS=${FT_BLOCKS_ARGS:---resolution 1024 --steps 3 --warmup 1 --patterns ^blocks\\.(1[4-8])\\. --cases $FT_CASES}
    FP8_ARGS=${FP8_ARGS:-}
    CACHE_ARGS=${CACHE_ARGS:-}
    PROFILE_ARGS=${PROFILE_ARGS:---compile --steps 2 --warmup 3}
    DEMO_ARGS=${DEMO_ARGS:-}
    DEMO=${DEMO:-1}
fi
# per-section limits (s), in run order; each is also cut to what is left before DEADLINE
L_FUSED=${L_FUSED:-45} L_TARGETS=${L_TARGETS:-150} L_PEERS=${L_PEERS:-100} L_SMALL=${L_SMALL:-110}
L_FT_FULL=${L_FT_FULL:-90} L_FT_BLOCKS=${L_FT_BLOCKS:-60}
L_FP8=${L_FP8:-45} L_CACHE=${L_CACHE:-45} L_PROFILE=${L_PROFILE:-60} L_DEMO=${L_DEMO:-60}
MIN_SECTION=${MIN_SECTION:-20}   # a section with less time left is skipped
SECTIONS="nvidia-smi python deps fused_qkv targets peers small_cards finetune_full finetune_blocks fp8_compute cache_build profile demo"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5 HF_HUB_OFFLINE=1 REQUIRE_CUDA

report() {  # report NAME STATUS
    echo "=== section $1: $2 (t=${SECONDS}s) ==="
    echo "$1 $2" >>"$OUT/status.txt"
}

remaining() { echo $((DEADLINE - SECONDS)); }

# section NAME LIMIT SCRIPT ARGS...: run `$PY SCRIPT ARGS` under timeout, log to $OUT/NAME.log; skipped when the
# script is missing or less than MIN_SECTION seconds are left
section() {
    local name=$1 limit=$2 script=$3; shift 3
    if [ ! -f "$script" ]; then echo "$name: $script is missing"; report "$name" skipped-missing; return; fi
    local left; left=$(( $(remaining) - 5 ))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt "$MIN_SECTION" ]; then echo "$name: skipped, ${left}s left"; report "$name" skipped-time; return; fi
    timeout -k 10 "$limit" "$PY" "$script" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    [ "$rc" -eq 124 ] && echo "$name: TIMED OUT after ${limit}s (partial results kept)"
    report "$name" "$rc"
}

session() {
    set -x
    : >"$OUT/status.txt"

    # --- machine and GPU -------------------------------------------------------------------------------------
    uname -a; nproc; free -g; df -h /tmp | tail -1
    if command -v nvidia-smi >/dev/null 2>&1 || [ "$REQUIRE_CUDA" != 0 ]; then
        nvidia-smi
        report nvidia-smi $?
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu \
            --format=csv
    else
        report nvidia-smi skipped-dry-run
    fi

    # --- python with torch (+ CUDA) ----------------------------------------------------------------------------
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
        timeout 120 "$base" -m venv --system-site-packages /tmp/anima-venv &&
            timeout 120 /tmp/anima-venv/bin/python -m pip install -q --retries 0 --timeout 10 -e . &&
            /tmp/anima-venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' &&
            PY=/tmp/anima-venv/bin/python
    fi
    [ -n "$PY" ]; report python $?
    [ -n "$PY" ] || return 1

    # --- our dependencies (carried wheels for what the image lacks) and the package from src/ ----------------
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
            timeout 60 "$PY" -m pip install -q --retries 0 --timeout 10 -e .
            echo "pip install -e .: exit $?"
        fi
    fi
    "$PY" -c "$check"' ; import torch, pydantic, diffusers, transformers; print("torch", torch.__version__, "pydantic",
pydantic.VERSION, "diffusers", diffusers.__version__, "transformers", transformers.__version__)'
    rc=$?; report deps $rc
    [ $rc -eq 0 ] || return 1
    git rev-parse --short HEAD 2>/dev/null || echo "no git here; commit from ANIMA_BENCH_COMMIT=${ANIMA_BENCH_COMMIT:-unset}"

    # --- the measurements, in priority order -------------------------------------------------------------------
    # shellcheck disable=SC2086  # *_ARGS are lists of arguments
    section fused_qkv "$L_FUSED" bench/fused_qkv.py --device "$DEV" $FUSED_ARGS --json-out "$OUT/fused_qkv.json"
    # shellcheck disable=SC2086
    section targets "$L_TARGETS" bench/train_step.py --device "$DEV" $TARGET_ARGS --json-out "$OUT/targets.json"
    # shellcheck disable=SC2086
    section peers "$L_PEERS" bench/train_step.py --device "$DEV" $PEER_ARGS --json-out "$OUT/peers.json"
    # shellcheck disable=SC2086
    section small_cards "$L_SMALL" bench/small_cards.py --device "$DEV" $SMALL_ARGS --json-out "$OUT/small_cards.json"
    # shellcheck disable=SC2086
    section finetune_full "$L_FT_FULL" bench/finetune_levers.py --device "$DEV" $FT_FULL_ARGS \
        --json-out "$OUT/finetune_full.json"
    # shellcheck disable=SC2086
    section finetune_blocks "$L_FT_BLOCKS" bench/finetune_levers.py --device "$DEV" $FT_BLOCKS_ARGS \
        --json-out "$OUT/finetune_blocks.json"
    # shellcheck disable=SC2086
    section fp8_compute "$L_FP8" bench/fp8_compute.py --device "$DEV" $FP8_ARGS --json-out "$OUT/fp8_compute.json"
    # shellcheck disable=SC2086
    section cache_build "$L_CACHE" bench/cache_build.py --device "$DEV" $CACHE_ARGS --json-out "$OUT/cache_build.json"
    # shellcheck disable=SC2086
    section profile "$L_PROFILE" bench/profile_step.py $PROFILE_ARGS

    # --- the demo end-to-end (training on the GPU: the loop's Accelerator picks cuda), only with time left ------
    limit=$(( $(remaining) - 5 )); [ "$limit" -gt "$L_DEMO" ] && limit=$L_DEMO
    if [ "$DEMO" = 0 ]; then
        report demo skipped-off
    elif [ "$limit" -lt 30 ]; then
        echo "demo: skipped, only ${limit}s left"; report demo skipped-time
    else
        rm -rf "$DEMO_DIR"
        # shellcheck disable=SC2086
        timeout -k 10 "$limit" "$PY" -c '
import os, sys, torch
from anima_trainer.cli import main
rc = main(["demo", "--out", sys.argv[1], "--overwrite", *sys.argv[2:]])
cuda = torch.cuda.is_available()
peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
name = torch.cuda.get_device_name(0) if cuda else "no GPU"
print(f"demo: exit {rc}, CUDA peak {peak:.1f} MiB on {name}")
sys.exit(rc or (3 if peak == 0 and os.environ["REQUIRE_CUDA"] != "0" else 0))  # 3: training never used the GPU
' "$DEMO_DIR" $DEMO_ARGS >"$OUT/demo.log" 2>&1
        rc=$?; tail -n 20 "$OUT/demo.log"; [ "$rc" -eq 124 ] && echo "demo: TIMED OUT after ${limit}s"
        for f in sample_before.png sample_after.png; do cp "$DEMO_DIR/$f" "$OUT/demo_$f" 2>/dev/null; done
        report demo "$rc"
    fi
    set +x
}

session 2>&1 | tee "$OUT/session.log"
set +x
echo "=== summary (t=${SECONDS}s) ==="
cat "$OUT/status.txt"
for f in targets peers small_cards; do grep '^|' "$OUT/$f.log" 2>/dev/null; done
ls -la "$OUT"
# a section fails with a non-zero exit; skipped ones (missing script, no time, dry run) are listed, not failures
failed=$(awk '$2 !~ /^(0|skipped.*)$/ {print $1}' "$OUT/status.txt" | tr '\n' ' ')
for s in $SECTIONS; do
    grep -q "^$s " "$OUT/status.txt" || failed="$failed$s(not reached) "
done
skipped=$(awk '$2 ~ /^skipped/ {print $1 "(" $2 ")"}' "$OUT/status.txt" | tr '\n' ' ')
[ -n "$skipped" ] && echo "SKIPPED: $skipped"
if [ -n "$failed" ]; then echo "FAILED: $failed"; exit 1; fi
echo "ALL SECTIONS OK (t=${SECONDS}s)"
