"""Host side of the emulation: prerequisites, and listing, removing and cleaning up the network
namespaces it creates.

Every namespace created by :mod:`.netns` is named ``mmx-<pid>[.<seq>]-{sw,node<k>,probe}`` (and
``node<k>w<j>`` for a worker's own namespace, :mod:`.workers`) so that
:func:`cleanup` can tell the leftovers of dead processes from those of live ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from typing import Any, Iterator

from ..runtime.launch import pid_alive

logger = logging.getLogger(__name__)

PREFIX = "mmx-"
"""Name prefix of every namespace this package creates."""

NS_RE = re.compile(r"^mmx-(\d+)(?:\.\d+)?-(?:node\d+(?:w\d+)?|sw|probe)$")
"""Names of the namespaces this package creates (group 1: the creating process id)."""


class EmulationError(RuntimeError):
    """Setting up or running the emulation failed."""


class EmulationUnavailable(EmulationError):
    """This machine cannot emulate: not root, no iproute2, no ``ip netns`` or no netem."""


def check_prerequisites() -> None:
    """Raise :class:`EmulationUnavailable` with a clear message unless root + iproute2 work."""
    if os.geteuid() != 0:
        raise EmulationUnavailable(
            "network emulation needs root (creating network namespaces and tc qdiscs needs "
            "CAP_NET_ADMIN); run as root or with sudo"
        )
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise EmulationUnavailable(
            f"network emulation needs iproute2 ({', '.join(missing)} not found); install it "
            "with: apt-get update && apt-get install -y iproute2"
        )
    proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise EmulationUnavailable(
            f"'ip netns' is unavailable here: {proc.stderr.strip() or proc.returncode}"
        )


def netem_available() -> bool:
    """Whether the kernel has the netem qdisc (needed for ``delay_ms``); tried in a scratch
    namespace that is removed again. Raises :class:`EmulationUnavailable` without root."""
    check_prerequisites()
    ns = f"mmx-{os.getpid()}-probe"
    subprocess.run(["ip", "netns", "add", ns], capture_output=True, check=True)
    try:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
             "delay", "1ms"], capture_output=True, text=True,
        )
        return proc.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def list_namespaces() -> list[str]:
    """Names from ``ip netns list`` (empty when it fails)."""
    proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if proc.returncode != 0:
        return []
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _namespace_pids(ns: str) -> list[int]:
    """Processes running inside namespace ``ns``."""
    proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def _remove_namespace(ns: str) -> bool:
    """Kill the processes inside ``ns`` (all started by this emulation), then delete ``ns``.
    Returns True when it is gone."""
    for _ in range(20):  # bounded: processes may take a moment to die
        pids = [p for p in _namespace_pids(ns) if p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return ns not in list_namespaces()


def cleanup(all_: bool = False) -> list[str]:
    """Remove namespaces named ``mmx-<pid>-...`` whose creating process is gone (``all_``: also
    those of live processes). Returns the removed names."""
    check_prerequisites()
    removed = []
    for ns in list_namespaces():
        m = NS_RE.match(ns)
        if not m:
            continue
        if not all_ and pid_alive(int(m.group(1))) and int(m.group(1)) != os.getpid():
            continue
        if _remove_namespace(ns):
            removed.append(ns)
        else:
            logger.warning("could not remove namespace %s", ns)
    return removed


class Interrupted(BaseException):
    """Raised in the main thread by :func:`signals_raise` on SIGINT / SIGTERM / SIGHUP, so that
    ``finally`` blocks and :class:`.netns.EmulatedCluster`'s ``__exit__`` tear down."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals that end a run: a user's Ctrl-C, a kill / slurm's time limit, a closed terminal."""


@contextlib.contextmanager
def _stop_signals_handled(handler: Any) -> Iterator[None]:
    """:data:`_STOP_SIGNALS` go to ``handler`` (main thread only: elsewhere nothing changes),
    and the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in _STOP_SIGNALS}
    for s in _STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def signals_raise() -> contextlib.AbstractContextManager[None]:
    """For front ends that hold emulated clusters: SIGINT, SIGTERM and SIGHUP raise
    :class:`Interrupted` (main thread only). Python's default SIGTERM ends the process at
    once, which left a killed run's namespaces and torchruns behind
    (``scripts/emulate_cluster.py --cleanup`` removed them)."""
    return _stop_signals_handled(_raise_interrupted)


def _signals_deferred() -> contextlib.AbstractContextManager[None]:
    """Ignore SIGINT/SIGTERM/SIGHUP during teardown (main thread only), so it completes."""
    return _stop_signals_handled(signal.SIG_IGN)
