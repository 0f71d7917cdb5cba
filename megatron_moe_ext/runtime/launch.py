"""Run a worker function on W local processes, either under torchrun or by spawning them.

Scripts (benchmark, calibration, validation) and tests call :func:`run_workers`: under torchrun
(RANK / WORLD_SIZE set) the worker runs in this process; otherwise W processes are spawned on
this host with the same environment variables torchrun would set.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, Optional


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an exited child nobody reaped yet,
    which still answers ``kill(pid, 0)`` but will never do anything again)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # gone meanwhile; without /proc (not Linux) kill() has the last word
        return not os.path.isdir("/proc")


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting RANK)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _entry(rank: int, fn: Callable[..., Optional[int]], world: int, port: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    rc = fn(rank, world, *args)
    if isinstance(rc, int) and rc:
        raise SystemExit(rc)


def _without_rank(rank: int, world: int, fn: Callable[..., Optional[int]], *args: Any):
    return fn(*args)  # the worker reads RANK / WORLD_SIZE from the environment, as under torchrun


def spawn(fn: Callable[..., Optional[int]], world: int, *args: Any) -> None:
    """Run fn(rank, world, *args) in `world` fresh processes with the torchrun environment set.
    `fn` must be importable (module level). A failing rank raises in the caller."""
    import torch.multiprocessing as mp

    mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True,
                       start_method="spawn")


def run_workers(fn: Callable[..., Optional[int]], world: int, *args: Any) -> int:
    """fn(*args) here under torchrun, else on `world` spawned processes; returns an exit code."""
    if under_torchrun():
        return fn(*args) or 0
    import torch.multiprocessing as mp

    try:
        spawn(_without_rank, world, fn, *args)
    except mp.ProcessExitedException as exc:
        return exc.exit_code or 1
    return 0
