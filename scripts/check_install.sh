#!/usr/bin/env bash
# Non-editable install check (issue 10, point 6): copy the working tree (tracked and untracked,
# not ignored files) to a temp dir, `pip install .` it into a fresh venv (dependencies: .venv's,
# see below), then from a directory outside the repository load a bundled cluster by name and
# run --describe on the installed configs. Usage: scripts/check_install.sh [python3]
set -euo pipefail
PY=${1:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "check_install: FAILED: $*" >&2; exit 1; }

mkdir "$TMP/src" "$TMP/cwd"
(cd "$REPO" && git ls-files -co --exclude-standard -z | tar -cf - --null -T -) | tar -xf - -C "$TMP/src"
"$PY" -m venv "$TMP/venv"
PIP=("$TMP/venv/bin/pip" install -q --disable-pip-version-check)
# The pinned dependencies are the ones scripts/setup_env.sh installed into .venv (CI runs it on
# the same clean clone just before): a path line in a .pth file puts .venv's site-packages
# behind the fresh venv's own. Only that directory is added, not the .pth files in it, so
# .venv's editable install of this package stays inactive and the import below can only find
# the non-editable copy. Without a .venv, the pins are installed into the fresh venv.
DEPS=""
if [ -x "$REPO/.venv/bin/python" ]; then
    DEPS=$("$REPO/.venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
fi
if [ -n "$DEPS" ] && [ -d "$DEPS/torch" ]; then
    SITE=$("$TMP/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$DEPS" > "$SITE/zz_pinned_deps_from_dot_venv.pth"
else
    "${PIP[@]}" torch==2.13.0 || fail "pip install torch==2.13.0"
    "${PIP[@]}" -r "$TMP/src/requirements-cpu.txt" || fail "pip install -r requirements-cpu.txt"
fi
"${PIP[@]}" --no-deps "$TMP/src" || fail "pip install --no-deps . (non-editable)"
rm -rf "$TMP/src"  # nothing may be read from the source tree from here on

cd "$TMP/cwd"
VPY="$TMP/venv/bin/python"
N=$("$VPY" -c "from megatron_moe_ext.perf.topology import load_cluster; print(load_cluster('johnny').num_workers)") \
    || fail "load_cluster('johnny') in the installed package"
[ "$N" = 16 ] || fail "load_cluster('johnny').num_workers printed '$N', expected 16"
PKG=$("$VPY" -c "import megatron_moe_ext, pretrain_gpt_moe as p; print(megatron_moe_ext.__file__, p.__file__)")
case "$PKG" in "$TMP/venv/"*" $TMP/venv/"*) ;; *) fail "package imported from outside the venv: $PKG" ;; esac
CFG=$("$VPY" -c "from megatron_moe_ext.perf.topology import CONFIG_DIR; print(CONFIG_DIR)")
case "$CFG" in "$TMP/venv/"*) ;; *) fail "configs resolved outside the venv: $CFG" ;; esac
OUT=$(OMP_NUM_THREADS=1 "$VPY" -m pretrain_gpt_moe --config "$CFG/models/moe-gpt.yaml" --describe \
    --cluster johnny 2>&1) || fail "--describe --cluster johnny: $OUT"
grep -q "smart schedule speedup" <<<"$OUT" || fail "--describe printed no prediction: $OUT"
OUT=$(OMP_NUM_THREADS=1 "$VPY" -m pretrain_gpt_moe --config "$CFG/gpt_moe_tiny.yaml" --describe \
    --cluster local-cpu model.vocab_size=4096 2>&1) || fail "--describe gpt_moe_tiny.yaml: $OUT"
grep -q "run scripts/calibrate.py first" <<<"$OUT" || fail "no calibration warning: $OUT"
if "$VPY" -m pretrain_gpt_moe --config "$CFG/gpt_moe_tiny.yaml" --describe --cluster nope \
    model.vocab_size=4096 >/dev/null 2>"$TMP/err"; then fail "--cluster nope succeeded"; fi
grep -q "bundled clusters: dgx-h100, johnny" "$TMP/err" || fail "missing cluster error: $(cat "$TMP/err")"
echo "check_install: OK (non-editable install: load_cluster('johnny') = 16 workers, --describe works)"
