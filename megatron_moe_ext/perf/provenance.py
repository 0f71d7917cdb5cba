"""Calibration provenance: who measured a cluster file, and whether it was this machine.

A calibrated cluster file (``scripts/calibrate.py``) carries a ``calibration`` mapping
(keys :data:`.cluster.CALIBRATION_KEYS`); :func:`this_machine` gives the current machine's
identity in those keys and :func:`calibration_note` warns when a file was measured elsewhere.
Both are importable from :mod:`.cluster` and :mod:`.topology` too.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from .cluster import ClusterSpec

__all__ = ["this_machine", "calibration_note"]


def _cpu_model() -> str:
    """The CPU model name (/proc/cpuinfo on Linux, platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _machine_id() -> str:
    """The systemd / dbus machine id, '' when there is none."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError:
            continue
    return ""


def this_machine() -> dict[str, Any]:
    """Identity of the current machine in ``calibration`` keys (host, machine_id, cpu,
    cores), for a calibration tool to record."""
    return {"host": platform.node(), "machine_id": _machine_id(), "cpu": _cpu_model(),
            "cores": os.cpu_count() or 0}


def calibration_note(spec: ClusterSpec) -> Optional[str]:
    """A warning when ``spec`` was calibrated on another machine, else None.

    None for descriptions without ``calibration`` (nominal numbers) and for a calibration whose
    ``machine_id`` is this machine's. Machines of one kind share host names and core counts,
    so without a machine id a calibration counts as foreign (unless this machine has no id
    either and host, CPU model and cores all match).
    """
    cal = spec.calibration
    if cal is None:
        return None
    here = this_machine()
    if cal.get("machine_id"):
        same = str(cal["machine_id"]) == here["machine_id"]
    else:
        keys = ("host", "cpu", "cores")
        same = not here["machine_id"] and all(str(cal.get(k)) == str(here[k]) for k in keys)
    if same:
        return None
    where = ", ".join(f"{k} {cal[k]}" for k in ("host", "cpu", "gpu", "cores", "clock",
                                                  "date_utc", "tool") if k in cal)
    return (f"cluster {spec.name!r} was calibrated on another machine ({where or 'unknown'}; "
            f"this one: host {here['host']}, {here['cores']} cores, cpu {here['cpu']}): its "
            "predictions may be far off here; run scripts/calibrate.py first")
