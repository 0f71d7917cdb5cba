"""Performance model of FasterMoE (DDL-Roofline), pure Python: no Megatron, no process groups.

- :mod:`.topology`: cluster YAML schema and the directed link graph with deterministic paths.
- :mod:`.model`: compute / all-to-all / collective times, sync and smart schedules, shadowing,
  :func:`predict_layer`.
- :mod:`.roofline`: roofline points for the four variants and their plot.
"""

from .model import (
    DTYPE_BYTES,
    LayerPrediction,
    all_to_all_time,
    compute_time,
    predict_layer,
    ring_allreduce_time,
    smart_schedule_bound,
    sync_e2e_time,
)
from .topology import ClusterSpec, ClusterSpecError, Topology, build_topology, load_cluster

__all__ = [
    "DTYPE_BYTES", "LayerPrediction", "all_to_all_time", "compute_time", "predict_layer",
    "ring_allreduce_time", "smart_schedule_bound", "sync_e2e_time", "ClusterSpec",
    "ClusterSpecError", "Topology", "build_topology", "load_cluster",
]
