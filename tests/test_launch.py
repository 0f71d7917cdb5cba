"""runtime/launch.py helpers that need no process group."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from megatron_moe_ext.runtime.launch import free_port, pid_alive


def test_pid_alive_live_zombie_and_gone():
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # exited but not reaped: a zombie
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.05)
    os.kill(child.pid, 0)  # still in the process table ...
    assert not pid_alive(child.pid)  # ... but not alive
    child.wait()
    assert not pid_alive(child.pid)


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
