"""Performance model of FasterMoE (DDL-Roofline), pure Python: no Megatron, no process groups.

- :mod:`.cluster`: cluster YAML schema, loader / writer, calibration provenance.
- :mod:`.topology`: the directed link graph with deterministic paths, ``ep_topology`` (and every
  public name of :mod:`.cluster`).
- :mod:`.model`: compute / all-to-all / collective times, sync and smart schedules (steps from
  ``core.plan.step_matrix``), shadowing, :func:`predict_layer`.
- :mod:`.linksim`: the ``links`` simulator of the smart schedule (every flow on its own links;
  validation grade), beside the model's ``lockstep`` one.
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
from .topology import (
    ClusterNotFoundError,
    ClusterSpec,
    ClusterSpecError,
    Topology,
    build_topology,
    ep_topology,
    load_cluster,
    save_cluster,
)

__all__ = [
    "DTYPE_BYTES", "LayerPrediction", "all_to_all_time", "compute_time", "predict_layer",
    "ring_allreduce_time", "smart_schedule_bound", "sync_e2e_time", "ClusterNotFoundError",
    "ClusterSpec", "ClusterSpecError", "Topology", "build_topology", "ep_topology",
    "load_cluster", "save_cluster",
]
