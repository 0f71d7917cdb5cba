#!/usr/bin/env bash
# The prepared one-GPU check (docs/gpu.md): installs only the wheels it is given, then runs
# megatron_moe_ext/gpu_check.py (training with both moe.impl, grouped-GEMM throughput, layer
# overhead at EP=1) and writes <out>/gpu_check.json and <out>/gpu_check.md.
#
#   scripts/fetch_gpu_wheels.sh            # on a machine with network: fills .whl/
#   scripts/gpu_check.sh                   # on the GPU machine, from the repository root
#   scripts/gpu_check.sh --out runs/gpu_check --steps 20
#
# Options of this script: --wheels DIR (default .whl), --site DIR (install target, default
# /tmp/site), --python EXE (default python3). Everything else goes to gpu_check.py
# (--out, --steps, --parts, --device cpu --smoke, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
SITE=/tmp/site
PY=python3
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) WHEELS=$2; shift 2 ;;
    --site) SITE=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
shopt -s nullglob
whls=("$WHEELS"/*.whl)
if [[ ${#whls[@]} -gt 0 ]]; then
  echo "[gpu_check.sh] installing ${#whls[@]} wheels from $WHEELS into $SITE (no index, no deps)"
  "$PY" -m pip install --quiet --no-index --no-deps --upgrade --target "$SITE" "${whls[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "[gpu_check.sh] no wheels in $WHEELS: using the packages already installed"
fi
"$PY" - <<'PYEOF'
import importlib.util, sys
missing = [m for m in ("torch", "megatron.core", "numpy", "yaml", "omegaconf", "psutil",
                       "packaging", "megatron_moe_ext") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"[gpu_check.sh] missing modules: {', '.join(missing)} "
             "(run scripts/fetch_gpu_wheels.sh where there is network and copy .whl/ here)")
PYEOF
exec "$PY" -m megatron_moe_ext.gpu_check "${ARGS[@]}"
