#!/usr/bin/env bash
# Create a venv with the pinned CPU stack (idempotent). Used by scripts/demo.sh and scripts/test.sh.
#   scripts/setup_env.sh                 -> .venv          (requirements-cpu.txt, megatron-core 0.16.1)
#   scripts/setup_env.sh --mcore 0.19.2  -> .venv-mcore019 (requirements-mcore019.txt)
# The CPU torch wheel is pinned first so that nothing pulls the multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
REQ=requirements-cpu.txt
if [ "${1:-}" = "--mcore" ]; then
  case "${2:-}" in
    0.19.2) VENV=.venv-mcore019; REQ=requirements-mcore019.txt ;;
    0.16.1) ;;
    *) echo "setup_env.sh: --mcore takes 0.16.1 or 0.19.2, got '${2:-}'" >&2; exit 2 ;;
  esac
elif [ $# -gt 0 ]; then
  echo "usage: scripts/setup_env.sh [--mcore 0.16.1|0.19.2]" >&2; exit 2
fi
STAMP=$VENV/.megatron-moe-ext-installed
if [ ! -f "$STAMP" ] || [ "$REQ" -nt "$STAMP" ] || [ setup.py -nt "$STAMP" ]; then
  [ -d "$VENV" ] || "$PY" -m venv "$VENV"
  "$VENV"/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV"/bin/python -m pip install -q torch==2.13.0
  if [ "$REQ" = requirements-cpu.txt ]; then
    "$VENV"/bin/python -m pip install -q -r "$REQ"
  else
    # megatron-core 0.17+ and triton: wheels only, no Python check, no dependencies
    nodeps=$(mktemp); rest=$(mktemp)
    grep -E '^(megatron-core|triton)==' "$REQ" > "$nodeps"
    grep -vE '^(megatron-core|triton)==' "$REQ" > "$rest"
    "$VENV"/bin/python -m pip install -q --ignore-requires-python --only-binary=:all: --no-deps \
      -r "$nodeps"
    "$VENV"/bin/python -m pip install -q -r "$rest"
    rm -f "$nodeps" "$rest"
  fi
  "$VENV"/bin/python -m pip install -q --no-deps -e .
  touch "$STAMP"
fi
