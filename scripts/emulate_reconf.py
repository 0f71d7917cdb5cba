#!/usr/bin/env python
"""Emulate the reconfigurable fabric for real: a trace's all-to-alls on per-worker namespaces,
circuits changed between windows, measured beside the model (docs/traffic.md).

    scripts/emulate_reconf.py --trace docs/data/traffic/phased4.bin \\
        --cluster docs/data/traffic/reconf4.yaml --scale 0.002 --json runs/reconf/phased4.json

Needs root and iproute2 (exit code 2 otherwise); ``--predict-only`` prints the model's side
alone (no emulator, no root). Library: megatron_moe_ext/emulation/reconf.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_moe_ext.emulation.namespaces import EmulationError, EmulationUnavailable
from megatron_moe_ext.emulation.reconf import ReconfSetup, format_table, predict, run_experiment
from megatron_moe_ext.perf.topology import ClusterSpecError, load_cluster


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", required=True, help="routing trace (file or run directory)")
    p.add_argument("--cluster", required=True, help="cluster YAML path or name")
    p.add_argument("--scale", type=float, required=True, help="emulated rate / cluster rate")
    p.add_argument("--nic-gbps", type=float, help="B (default: the cluster's first NIC)")
    p.add_argument("--oversub", type=float, default=4.0, help="tree oversubscription")
    p.add_argument("--ocs-gbps", type=float, help="circuit port rate (default: B)")
    p.add_argument("--ports", type=int, default=1, help="circuit ports per worker")
    p.add_argument("--region", type=int, default=2, help="region size k")
    p.add_argument("--reconfig-every", type=int, default=3, metavar="R",
                   help="records per window")
    p.add_argument("--max-records", type=int, default=32, help="last records of the trace")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the workload")
    p.add_argument("--predict-only", action="store_true",
                   help="the model's prediction per fabric and window only: no emulator, no root")
    p.add_argument("--json", help="write the result record here")
    p.add_argument("--markdown", help="write the tables here")
    args = p.parse_args(argv)
    try:
        setup = ReconfSetup(
            trace=args.trace, cluster=load_cluster(args.cluster), scale=args.scale,
            nic_gbps=args.nic_gbps, oversub=args.oversub, ocs_gbps=args.ocs_gbps,
            ports=args.ports, region=args.region, reconfig_every=args.reconfig_every,
            max_records=args.max_records, timeout_s=args.timeout)
        result = predict(setup) if args.predict_only else run_experiment(setup)
    except EmulationUnavailable as exc:
        print(f"[reconf] cannot emulate: {exc}", file=sys.stderr)
        return 2
    except (EmulationError, ClusterSpecError, ValueError, OSError) as exc:
        print(f"[reconf] error: {exc}", file=sys.stderr)
        return 2
    table = format_table(result)
    print(table, end="")
    for path, text in ((args.json, json.dumps(result, indent=1)), (args.markdown, table)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + ("\n" if not text.endswith("\n") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
