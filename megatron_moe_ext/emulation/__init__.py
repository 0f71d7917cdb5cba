"""Emulating a multi-node cluster on one machine (network namespaces, veth, bridge, tbf).

See :mod:`.netns` and ``docs/emulation.md``. Nothing here is imported by the training code.
"""

from .netns import (
    EmulatedCluster,
    EmulatedLink,
    EmulationError,
    EmulationUnavailable,
    auto_scale,
    check_prerequisites,
    cleanup,
    intra_node_link,
    measure_local_gemm_tflops,
    netem_available,
    node_nic_gbps,
    plan_links,
)

__all__ = [
    "EmulatedCluster", "EmulatedLink", "EmulationError", "EmulationUnavailable", "auto_scale",
    "check_prerequisites", "cleanup", "intra_node_link", "measure_local_gemm_tflops",
    "netem_available", "node_nic_gbps", "plan_links",
]
