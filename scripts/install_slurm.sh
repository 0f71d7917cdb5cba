#!/usr/bin/env bash
# Install Debian's Slurm + munge (slurmctld slurmd slurm-client munge) if any binary is missing.
# Needed only by tests/slurm (a real two-node Slurm on this machine, scripts/slurm/local_cluster.py).
# Idempotent and quiet: does nothing when everything is present; root only (no sudo).
# A non-root user without the packages gets a message and exit status 0 (the tests then skip).
set -euo pipefail

need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
{ command -v munged >/dev/null 2>&1 || [ -x /usr/sbin/munged ]; } || need+=(munge)
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install_slurm.sh: missing ${need[*]}; not root, so not installing (the slurm tests will skip)." \
       "Install with: sudo apt-get install -y slurmctld slurmd slurm-client munge" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm.sh: apt-get not found; install slurmctld slurmd slurm-client munge by hand" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
# Package post-install scripts must not start daemons (no systemd here, and the test harness
# starts its own slurmctld/slurmd/munged).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1
fi
trap 'rm -f "$log"; if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi' EXIT
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
         slurmctld slurmd slurm-client munge; } >"$log" 2>&1; then
  echo "install_slurm.sh: apt-get failed:" >&2
  tail -n 30 "$log" >&2
  exit 1
fi
echo "install_slurm.sh: installed ${need[*]}"
