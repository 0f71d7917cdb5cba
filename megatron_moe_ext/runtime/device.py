"""Device selection and process-group start-up (torchrun environment)."""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_moe_ext.config import ConfigError, RuntimeConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """What the process runs on."""

    device: torch.device
    """cpu or cuda:<local rank>."""
    backend: str
    """gloo or nccl."""
    rank: int
    """Global rank."""
    world_size: int
    """Number of processes."""
    local_rank: int
    """Rank on this node."""
    local_world_size: int
    """Processes on this node."""

    @property
    def is_cpu(self) -> bool:
        """Whether the CPU runtime is in use."""
        return self.device.type == "cpu"


# Import-time notices of megatron-core / torch that say nothing actionable on this stack
# (they fire on every rank and bury the training log). Matched by message, nothing else.
_KNOWN_NOISE = (
    r"Apex is not installed.*",
    r"Transformer Engine and Apex are not installed.*",
    r"full scope is deprecated.*",
    r"`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated.*",
    # The CPU runtime's TorchFunctionMode sees megatron's DDP read `.grad` of main-param views.
    r"The .grad attribute of a Tensor that is not a leaf Tensor is being accessed.*",
)


def quiet_known_warnings() -> None:
    """Silence the warnings listed in _KNOWN_NOISE (and only those)."""
    for pattern in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def resolve_device(cfg: RuntimeConfig) -> str:
    """`auto` -> cuda when available, else cpu. Errors when cuda is asked for but absent."""
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: cuda but no CUDA device is available; use auto or cpu")
    return cfg.device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def launch_info() -> tuple[int, int, int, int]:
    """(rank, world, local_rank, local_world) from the torchrun environment (1 process if absent)."""
    return (
        _env_int("RANK", 0),
        _env_int("WORLD_SIZE", 1),
        _env_int("LOCAL_RANK", 0),
        _env_int("LOCAL_WORLD_SIZE", 1),
    )


def default_threads(cfg: RuntimeConfig, local_world: int) -> int:
    """torch intra-op threads per CPU process.

    ``runtime.num_threads`` when set; else ``OMP_NUM_THREADS`` when the launcher set it (torch's
    own convention: torchrun and ``scripts/emulate_cluster.py`` set it to 1 because several
    processes share the cores, and the emulator's nodes all run on this one machine, which
    LOCAL_WORLD_SIZE cannot see); else usable cores // local processes.
    """
    if cfg.num_threads:
        return cfg.num_threads
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # "4,2" = nested levels
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, local_world))


def setup_runtime(cfg: RuntimeConfig, device: str) -> Runtime:
    """Switch on the CPU runtime if needed, then start the default process group.

    The default group is only the rendezvous: every model-parallel group used afterwards
    comes from megatron's parallel_state and is passed explicitly.
    """
    rank, world, local_rank, local_world = launch_info()
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    if device == "cpu":
        from megatron_moe_ext.runtime import cpu

        cpu.activate()
        torch.set_num_threads(default_threads(cfg, local_world))
        dev = torch.device("cpu")
    else:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=cfg.timeout_minutes),
        )
    return Runtime(dev, backend, rank, world, local_rank, local_world)
