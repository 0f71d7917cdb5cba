#!/usr/bin/env python
"""A real two-node Slurm cluster on this one machine, for testing the sbatch scripts: start,
stop or show it (megatron_moe_ext/slurm_local.py, whose docstring says how it works).

    python scripts/slurm/local_cluster.py --up      # prints: export SLURM_CONF=...
    SLURM_CONF=/tmp/moe-local-slurm/slurm.conf sbatch -N2 scripts/slurm/pretrain.sbatch ...
    python scripts/slurm/local_cluster.py --down    # cancels jobs, stops every daemon

Needs root (slurmd runs jobs as any user) and the Debian packages slurmctld, slurmd,
slurm-client and munge (``scripts/install_slurm.sh`` installs them).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from megatron_moe_ext.slurm_local import DEFAULT_DIR, ClusterError, LocalSlurm, SlurmUnavailable


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--up", action="store_true", help="start the cluster (and leave it running)")
    g.add_argument("--down", action="store_true", help="cancel jobs and stop every daemon")
    g.add_argument("--status", action="store_true", help="show sinfo / squeue")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"scratch folder (default {DEFAULT_DIR})")
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for idle nodes")
    args = p.parse_args(argv)
    cluster = LocalSlurm(args.dir)
    try:
        if args.up:
            cluster.up(args.timeout)
            print(f"two-node Slurm up: nodes {', '.join(cluster.nodes)}; state in {cluster.root}")
            print(f"export SLURM_CONF={cluster.conf}")
        elif args.down:
            cluster.down()
            print(f"stopped the cluster in {cluster.root}")
        else:
            for c in (["sinfo"], ["squeue"]):
                sys.stdout.write(cluster.cmd(c, check=False).stdout)
    except (SlurmUnavailable, ClusterError) as exc:
        sys.stderr.write(f"local_cluster: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
