#!/usr/bin/env bash
# Download what scripts/gpu_check.sh installs offline on the GPU machine (Python 3.12,
# torch 2.11 + CUDA already there, no network): cp312 manylinux wheels of megatron-core and of
# every package our code imports that torch does not bring, at the versions pinned in
# requirements-cpu.txt, plus this package as a wheel. Into .whl/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PY:-python3}
mkdir -p "$DEST"
# the pins, said once in requirements-cpu.txt
NAMES='megatron-core|numpy|packaging|PyYAML|omegaconf|tokenizers|psutil'
mapfile -t PINS < <(grep -E "^($NAMES)==" requirements-cpu.txt)
echo "[fetch_gpu_wheels] ${PINS[*]}"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 \
  --platform manylinux_2_12_x86_64 -d "$DEST" "${PINS[@]}"
"$PY" -m pip wheel --no-deps --no-build-isolation -w "$DEST" .
ls -l "$DEST"
