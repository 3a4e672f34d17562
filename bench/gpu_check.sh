#!/usr/bin/env bash
# The CUDA checks of bench/gpu_check.py, one line each, with the first Python whose torch sees a
# GPU ($PYTHON, then .venv, then python3). Arguments go to the script (--model DIR, --steps N).
set -euo pipefail
cd "$(dirname "$0")/.."
has_cuda='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'
py="${PYTHON:-}"
if [ -z "$py" ]; then
    for candidate in .venv/bin/python python3; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "$has_cuda" 2>/dev/null; then
            py="$candidate"
            break
        fi
    done
fi
exec "${py:-python3}" bench/gpu_check.py "$@"
