#!/usr/bin/env bash
# Create ./.venv with the pinned CPU stack (idempotent). Used by scripts/demo.sh and scripts/test.sh.
# The CPU torch wheel is pinned first so that nothing pulls the multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.megatron-moe-ext-installed
if [ ! -f "$STAMP" ] || [ requirements-cpu.txt -nt "$STAMP" ] || [ setup.py -nt "$STAMP" ]; then
  [ -d .venv ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -r requirements-cpu.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  touch "$STAMP"
fi
