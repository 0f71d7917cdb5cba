#!/usr/bin/env python
"""Traffic report of a routing trace (``logging.routing_trace: true``): heatmaps, expert
popularity, mFabric's locality figures and fabric what-ifs, with a markdown summary.

    python scripts/traffic_report.py runs/gpt_moe_tiny --cluster johnny --out runs/traffic

The library is megatron_moe_ext/traffic/ (docs/traffic.md explains every figure).
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_or_trace", metavar="RUN_OR_TRACE",
                   help="a run directory (its routing_trace.bin) or a trace file")
    p.add_argument("--cluster", metavar="NAME_OR_PATH",
                   help="cluster for node matrices, costs and the fabric what-ifs")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--window", type=int, default=1,
                   help="records per locality window (best regions chosen per window)")
    p.add_argument("--no-fabric", action="store_true", help="skip the fabric what-ifs")
    p.add_argument("--nic-gbps", type=float, help="per-worker NIC rate of the tree fabrics")
    p.add_argument("--oversub", type=float, default=2.0, help="oversubscription of the tree")
    p.add_argument("--region", type=int, help="region size k of the reconfigurable fabric")
    p.add_argument("--ports", type=int, default=2, help="circuit ports per worker")
    p.add_argument("--reconfig-every", type=int, default=8, metavar="R",
                   help="iterations between circuit reassignments")
    p.add_argument("--delay-ms", type=float, default=1.0, help="reconfiguration delay")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from megatron_moe_ext.perf.cluster import ClusterSpecError, load_cluster
    from megatron_moe_ext.traffic.report import build_report
    from megatron_moe_ext.traffic.trace import read_trace

    try:
        trace = read_trace(args.run_or_trace)
        cluster = load_cluster(args.cluster) if args.cluster else None
        build_report(trace, args.out, cluster, window=args.window, fabric=not args.no_fabric,
                     fabric_kwargs=dict(nic_gbps=args.nic_gbps, oversub=args.oversub,
                                        region=args.region, ports=args.ports,
                                        reconfig_every=args.reconfig_every,
                                        delay_ms=args.delay_ms))
    except (ClusterSpecError, FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(open(f"{args.out}/summary.md", encoding="utf-8").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
