#!/usr/bin/env bash
# Set up the pinned environment and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# A real two-node Slurm runs in tests/slurm (Debian packages; root only, idempotent).
bash scripts/install_slurm.sh || true
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q tests "$@"
