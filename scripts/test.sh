#!/usr/bin/env bash
# Set up the pinned environments and run the tests (what CI runs):
#   1. the whole suite on the default pin (.venv, megatron-core 0.16.1);
#   2. the Megatron-facing tests (tests/conftest.py:MEGATRON_FACING) on megatron-core 0.19.2
#      (.venv-mcore019);
#   3. a non-editable `pip install .` into a fresh venv (scripts/check_install.sh).
# Arguments go to both pytest runs (e.g. a test path or -k). Both runs always happen; the exit
# code is the first non-zero one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/setup_env.sh --mcore 0.19.2
# A real two-node Slurm runs in tests/slurm (Debian packages; root only, idempotent).
bash scripts/install_slurm.sh || true
export OMP_NUM_THREADS=1
rc=0
echo "== megatron-core 0.16.1 (.venv): whole suite"
.venv/bin/python -m pytest -q tests "$@" || rc=$?
echo "== megatron-core 0.19.2 (.venv-mcore019): Megatron-facing tests"
start=$SECONDS
rc2=0
.venv-mcore019/bin/python -m pytest -q -m megatron_facing tests "$@" || rc2=$?
echo "== megatron-core 0.19.2 part: $((SECONDS - start)) s, exit code $rc2"
if [ "$rc" -eq 0 ]; then rc=$rc2; fi
echo "== non-editable install check (scripts/check_install.sh)"
rc3=0
bash scripts/check_install.sh || rc3=$?
if [ "$rc" -eq 0 ]; then rc=$rc3; fi
exit "$rc"
