#!/usr/bin/env bash
# One entry point for a fresh machine:  ./dev.sh demo   |   ./dev.sh test [pytest args]
# Creates .venv (once), installs PyTorch (kept if already present) and this package, then runs.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# TORCH_SPEC lets a GPU user pick a CUDA build; the default is the CPU build this project's CI uses.
python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[test]"
cmd="${1:-test}"; shift || true
case "$cmd" in
    demo) exec anima-trainer demo "$@" ;;
    test)
        if [ -z "${ANIMA_TEST_TOKENIZERS:-}" ] && [ -d ../shared/tokenizers ]; then
            export ANIMA_TEST_TOKENIZERS="$(cd ../shared/tokenizers && pwd)"
        fi
        exec python -m pytest "$@" ;;
    *) echo "usage: ./dev.sh demo|test [args]" >&2; exit 2 ;;
esac
