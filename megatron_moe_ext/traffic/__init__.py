"""See the traffic, plan the layout (issue 13).

- :mod:`.trace`: the routing-trace file (writer, reader, header).
- :mod:`.recorder`: ``logging.routing_trace`` (router hooks, all-gather, append).
- :mod:`.replay`: a trace's counts as forced routing for the layer benchmark.
- :mod:`.locality`: mFabric's locality figures from counts, placement and a cluster.
- :mod:`.fabric`: fabric what-ifs with the performance model, performance per cost.
- :mod:`.report`: heatmaps, popularity plot, markdown summary (``scripts/traffic_report.py``).
- :mod:`.planner`: the Aristos layout planner (``pretrain_gpt_moe.py --describe --plan-layout``).

Only :mod:`.recorder` and :mod:`.replay` import torch.
"""

from .trace import TRACE_FILE, RoutingTrace, TraceHeader, TraceWriter, read_trace, write_trace

__all__ = ["TRACE_FILE", "RoutingTrace", "TraceHeader", "TraceWriter", "read_trace", "write_trace"]
