"""The scale lab: the paper's clusters on one machine, with emulated accelerators (sleeping for
the cluster's GEMM time) on emulated links (:mod:`megatron_moe_ext.emulation`).

No megatron-core import anywhere in this package. See docs/emulation.md, "The scale lab".
"""

from .accelerator import EmulatedAccelerator, SleepStats
from .baseline import sync_exchange
from .run import LabConfig, lab_worker, run_lab
from .setup import lab_counts, lab_topology, resolve_dilation, select_shadows

__all__ = ["EmulatedAccelerator", "LabConfig", "SleepStats", "lab_counts", "lab_topology",
           "lab_worker", "resolve_dilation", "run_lab", "select_shadows", "sync_exchange"]
