"""Cluster descriptions: the YAML schema, its loader and writer (calibration provenance:
:mod:`.provenance`, re-exported here).

Notation
--------
N        workers in total, N = nodes * M
M        workers per node (``workers_per_node``)
P        achieved GEMM throughput of one worker (TFLOP/s in YAML), per dtype

A cluster file describes one node's internal graph (vertices: workers ``w0..w{M-1}`` and
named switches such as ``pcie0``, ``cpu0``, ``nvswitch``), the NICs of a node (each attached
to a vertex of that graph and to one non-blocking inter-node switch), and GEMM throughput::

    name: johnny
    nodes: 2
    workers_per_node: 8
    gemm_tflops: {fp32: 11.5, bf16: 11.5}
    links:
      - {a: w0, b: pcie0, gbps: 88, kind: pcie}
    nics:
      - {attach: cpu0, gbps: 50}
    inter_node: {switch: ib}
    calibration: {host: vm, clock: cpu, date_utc: "2026-11-22 16:04", tool: scripts/calibrate.py}

The bundled descriptions live in ``configs/clusters/`` of the repository, which setup.py
ships as package data (``megatron_moe_ext/configs/clusters/`` once installed), so a bare
name such as ``johnny`` resolves in a checkout and after ``pip install .`` alike.
:func:`load_cluster` reads a file, :func:`save_cluster` writes one (the inverse:
``load_cluster(p)`` after ``save_cluster(spec, p)`` equals ``spec``; comments are not kept).

Two optional keys serve the traffic tools (megatron_moe_ext/traffic/, docs/traffic.md):
``memory_gib`` (memory of one worker, the layout planner's constraint) and ``link_costs``
(``{kind: {usd, usd_per_gbps}}``, prices for the fabric what-ifs' performance per cost).

Calibrated files (``scripts/calibrate.py``) carry a ``calibration`` mapping recording where
and how they were measured; :func:`calibration_note` says when it was another machine. The
shipped ``local-cpu.yaml`` is such a calibration, made on 2026-11-22 on a 2-core CPU VM that
is not the machine you run on: run ``scripts/calibrate.py`` before trusting its predictions.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from .provenance import calibration_note, this_machine  # re-exported

logger = logging.getLogger(__name__)

GBIT = 1e9 / 8.0
"""Bytes per second in one Gbit/s."""


def _config_dir() -> Path:
    """The shipped configs: package data when installed, else the repository's ``configs/``."""
    installed = Path(__file__).resolve().parents[1] / "configs"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "configs"


CONFIG_DIR = _config_dir()
"""Directory of the shipped configs (``gpt_moe_tiny.yaml``, ``models/``, ``clusters/``)."""

CLUSTER_DIR = CONFIG_DIR / "clusters"
"""Directory searched by :func:`load_cluster` when given a bare cluster name."""

REQUIRED_DTYPES = ("fp32", "bf16")
"""Dtypes every cluster file must give a GEMM throughput for."""

CALIBRATION_KEYS = ("host", "machine_id", "cpu", "gpu", "cores", "clock", "date_utc", "tool",
                    "command", "torch", "threads_per_worker", "notes")
"""Accepted keys of the optional ``calibration`` mapping (see :attr:`ClusterSpec.calibration`)."""

class ClusterSpecError(ValueError):
    """A problem in a cluster description; the message names the file and the bad key."""


class ClusterNotFoundError(ClusterSpecError, FileNotFoundError):
    """No cluster file of that name or path; the message names it and the bundled clusters."""


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------


class _Bandwidth:
    """``bandwidth`` of a spec with ``gbps`` per physical link and ``count`` links."""

    gbps: float
    count: int

    @property
    def bandwidth(self) -> float:
        """Aggregate one-direction bandwidth in bytes/s."""
        return self.gbps * self.count * GBIT


@dataclass(frozen=True)
class LinkSpec(_Bandwidth):
    """An undirected intra-node connection between two named vertices of a node."""

    a: str
    """One end: a worker ``w<i>`` (0 <= i < workers_per_node) or a switch name."""
    b: str
    """The other end."""
    gbps: float
    """One-direction bandwidth of one physical link, Gbit/s (measured, not nominal)."""
    count: int = 1
    """Number of parallel physical links (e.g. 2 for a double NVLink); bandwidth multiplies."""
    latency_us: float = 0.0
    """One-way latency in microseconds (informational; the model ignores latency)."""
    kind: str = ""
    """Free-form label, e.g. ``pcie``, ``qpi``, ``nvlink``."""


@dataclass(frozen=True)
class NicSpec(_Bandwidth):
    """A network adapter of every node, between ``attach`` and the inter-node switch."""

    attach: str
    """Vertex of the node graph the NIC hangs off (a switch, a CPU socket or a worker)."""
    gbps: float
    """One-direction bandwidth, Gbit/s."""
    count: int = 1
    """Number of bonded ports; bandwidth multiplies."""
    latency_us: float = 0.0
    """One-way latency in microseconds (informational)."""


@dataclass(frozen=True)
class LinkCost:
    """Price of one physical link of a kind: ``usd + usd_per_gbps * gbps``."""

    usd: float = 0.0
    """Fixed part per link (e.g. a circuit-switch port, whatever its rate)."""
    usd_per_gbps: float = 0.0
    """Part growing with the link's rate (NIC, transceivers, packet-switch port)."""

    def price(self, gbps: float, count: int = 1) -> float:
        """USD of ``count`` links of ``gbps`` each."""
        return count * (self.usd + self.usd_per_gbps * gbps)


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster: identical nodes, an intra-node link graph, NICs and GEMM throughput."""

    name: str
    """Cluster name, e.g. ``johnny``."""
    nodes: int
    """Number of nodes."""
    workers_per_node: int
    """Workers (GPUs or CPU processes) per node, M."""
    gemm_tflops: Mapping[str, float]
    """Achieved GEMM throughput per dtype in TFLOP/s (e.g. 90% of peak, or measured)."""
    links: tuple[LinkSpec, ...] = ()
    """Intra-node links (the same graph in every node)."""
    nics: tuple[NicSpec, ...] = ()
    """NICs of each node; one per worker is allowed (attach each to its worker)."""
    inter_switch: str = "net"
    """Name of the non-blocking inter-node switch vertex."""
    gemm_curve: Mapping[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    """Optional efficiency curve per dtype: (tokens per GEMM, TFLOP/s) points, interpolated."""
    description: str = ""
    """Free text: hardware, sources and assumptions."""
    duplex: str = "full"
    """``full``: the two directions between two workers are independent (NCCL, RDMA, raw
    TCP). ``half``: the transport moves one direction of a worker pair at a time, so a pair's
    exchange costs the bytes of both directions over the path's bottleneck; gloo's TCP pairs
    behave so (docs/emulation.md). ``scripts/calibrate.py`` writes ``half`` when its
    simultaneous exchange is well below the ping-pong rate."""
    calibration: Optional[Mapping[str, Any]] = None
    """Provenance of measured numbers, None for nominal / paper descriptions. Keys (all
    optional, scalars): ``host`` (platform.node()), ``machine_id`` (/etc/machine-id), ``cpu``
    and ``gpu`` (models), ``cores``, ``clock`` (``cpu`` or ``wall``: what the GEMM rates were
    timed with), ``date_utc``, ``tool`` (e.g. ``scripts/calibrate.py``), ``command``,
    ``torch``, ``threads_per_worker``, ``notes``. :func:`calibration_note` compares it with
    the current machine."""
    link_costs: Mapping[str, "LinkCost"] = field(default_factory=dict)
    """Optional prices per link ``kind`` (``nic`` for NICs, e.g. ``pcie``, ``nvlink``; the
    fabric what-ifs also use ``uplink`` for switch-to-switch links and ``ocs`` for optical
    circuits): YAML ``link_costs: {nic: {usd: 300, usd_per_gbps: 8}}``, a physical link
    costs ``count * (usd + usd_per_gbps * gbps)`` (transceivers, cables and switch ports
    included). Used only for performance per cost (megatron_moe_ext/traffic/fabric.py)."""
    memory_gib: Optional[float] = None
    """Optional memory of one worker in GiB: the layout planner's memory constraint."""

    @property
    def num_workers(self) -> int:
        """N = nodes * workers_per_node."""
        return self.nodes * self.workers_per_node


_TOP_KEYS = {
    "name", "nodes", "workers_per_node", "gemm_tflops", "gemm_curve", "links", "nics",
    "inter_node", "description", "duplex", "calibration", "link_costs", "memory_gib",
}
DUPLEX_MODES = ("full", "half")
"""Accepted values of the top-level ``duplex`` key."""
_LINK_KEYS = {"a", "b", "gbps", "count", "latency_us", "kind"}
_NIC_KEYS = {"attach", "gbps", "count", "latency_us"}
_INTER_KEYS = {"switch"}


def _check_keys(where: str, data: Any, allowed: set[str], required: Sequence[str]) -> None:
    """Raise :class:`ClusterSpecError` for a non-mapping, unknown or missing keys."""
    if not isinstance(data, Mapping):
        raise ClusterSpecError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise ClusterSpecError(
            f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})"
        )
    for key in required:
        if key not in data:
            raise ClusterSpecError(f"{where}.{key}: required key is missing")


def _number(where: str, value: Any, positive: bool = True) -> float:
    """Return ``value`` as float; it must be a number (and > 0 when ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ClusterSpecError(f"{where}: expected a number, got {value!r}")
    if positive and not value > 0:
        raise ClusterSpecError(f"{where}: must be > 0, got {value!r}")
    if not positive and value < 0:
        raise ClusterSpecError(f"{where}: must be >= 0, got {value!r}")
    return float(value)


def _integer(where: str, value: Any) -> int:
    """Return ``value`` as a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ClusterSpecError(f"{where}: expected a positive integer, got {value!r}")
    return int(value)


def _check_vertex(where: str, name: Any, workers_per_node: int) -> str:
    """A vertex name is a string; ``w<i>`` names must be existing workers."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ClusterSpecError(f"{where}: expected a vertex name without '/', got {name!r}")
    if name[0] == "w" and name[1:].isdigit() and int(name[1:]) >= workers_per_node:
        raise ClusterSpecError(
            f"{where}: worker {name!r} does not exist (workers_per_node={workers_per_node})"
        )
    return name


def cluster_spec_from_dict(data: Mapping[str, Any], source: str = "<cluster>") -> ClusterSpec:
    """Validate a parsed cluster description and build a :class:`ClusterSpec`.

    Errors name ``source`` and the dotted key, e.g. ``johnny.yaml: links[3].gbps: ...``.
    """
    _check_keys(source, data, _TOP_KEYS, ("name", "nodes", "workers_per_node", "gemm_tflops"))
    m = _integer(f"{source}: workers_per_node", data["workers_per_node"])
    nodes = _integer(f"{source}: nodes", data["nodes"])
    tflops_raw = data["gemm_tflops"]
    if not isinstance(tflops_raw, Mapping):
        raise ClusterSpecError(f"{source}: gemm_tflops: expected a mapping dtype -> TFLOP/s")
    tflops = {str(k): _number(f"{source}: gemm_tflops.{k}", v) for k, v in tflops_raw.items()}
    for dtype in REQUIRED_DTYPES:
        if dtype not in tflops:
            raise ClusterSpecError(f"{source}: gemm_tflops.{dtype}: required key is missing")
    curves: dict[str, tuple[tuple[float, float], ...]] = {}
    for dtype, points in (data.get("gemm_curve") or {}).items():
        where = f"{source}: gemm_curve.{dtype}"
        if not isinstance(points, Sequence) or not points:
            raise ClusterSpecError(f"{where}: expected a list of [tokens, tflops] pairs")
        pts = []
        for i, pt in enumerate(points):
            if not isinstance(pt, Sequence) or len(pt) != 2:
                raise ClusterSpecError(f"{where}[{i}]: expected [tokens, tflops]")
            pts.append((_number(f"{where}[{i}][0]", pt[0]), _number(f"{where}[{i}][1]", pt[1])))
        curves[str(dtype)] = tuple(sorted(pts))
    links: list[LinkSpec] = []
    seen: set[frozenset[str]] = set()
    for i, raw in enumerate(data.get("links") or []):
        where = f"{source}: links[{i}]"
        _check_keys(where, raw, _LINK_KEYS, ("a", "b", "gbps"))
        a = _check_vertex(f"{where}.a", raw["a"], m)
        b = _check_vertex(f"{where}.b", raw["b"], m)
        if a == b or frozenset((a, b)) in seen:
            raise ClusterSpecError(f"{where}: self loop or duplicate link {a}-{b} (use count)")
        seen.add(frozenset((a, b)))
        links.append(LinkSpec(
            a=a, b=b, gbps=_number(f"{where}.gbps", raw["gbps"]),
            count=_integer(f"{where}.count", raw.get("count", 1)),
            latency_us=_number(f"{where}.latency_us", raw.get("latency_us", 0.0), False),
            kind=str(raw.get("kind", "")),
        ))
    nics: list[NicSpec] = []
    for i, raw in enumerate(data.get("nics") or []):
        where = f"{source}: nics[{i}]"
        _check_keys(where, raw, _NIC_KEYS, ("attach", "gbps"))
        attach = _check_vertex(f"{where}.attach", raw["attach"], m)
        if any(n.attach == attach for n in nics):
            raise ClusterSpecError(f"{where}.attach: second NIC on {attach!r} (use count)")
        nics.append(NicSpec(
            attach=attach, gbps=_number(f"{where}.gbps", raw["gbps"]),
            count=_integer(f"{where}.count", raw.get("count", 1)),
            latency_us=_number(f"{where}.latency_us", raw.get("latency_us", 0.0), False),
        ))
    inter = data.get("inter_node") or {}
    _check_keys(f"{source}: inter_node", inter, _INTER_KEYS, ())
    switch = str(inter.get("switch", "net"))
    if nodes > 1 and not nics:
        raise ClusterSpecError(f"{source}: nics: a cluster with {nodes} nodes needs a NIC")
    duplex = str(data.get("duplex", "full"))
    if duplex not in DUPLEX_MODES:
        raise ClusterSpecError(f"{source}: duplex: {duplex!r} is not one of {list(DUPLEX_MODES)}")
    if m > 1 and not links:
        raise ClusterSpecError(f"{source}: links: {m} workers per node need intra-node links")
    return ClusterSpec(
        name=str(data["name"]), nodes=nodes, workers_per_node=m, gemm_tflops=tflops,
        links=tuple(links), nics=tuple(nics), inter_switch=switch, gemm_curve=curves,
        description=str(data.get("description", "")), duplex=duplex,
        calibration=_calibration(source, data.get("calibration")),
        link_costs=_link_costs(source, data.get("link_costs")),
        memory_gib=(None if data.get("memory_gib") is None
                    else _number(f"{source}: memory_gib", data["memory_gib"])),
    )


def _link_costs(source: str, raw: Any) -> dict[str, LinkCost]:
    """Validate the optional ``link_costs`` mapping: kind -> {usd, usd_per_gbps}."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ClusterSpecError(f"{source}: link_costs: expected a mapping kind -> "
                               "{usd, usd_per_gbps}")
    out = {}
    for kind, cost in raw.items():
        where = f"{source}: link_costs.{kind}"
        _check_keys(where, cost, {"usd", "usd_per_gbps"}, ())
        out[str(kind)] = LinkCost(
            usd=_number(f"{where}.usd", cost.get("usd", 0.0), False),
            usd_per_gbps=_number(f"{where}.usd_per_gbps", cost.get("usd_per_gbps", 0.0), False))
    return out


def _calibration(source: str, raw: Any) -> Optional[dict[str, Any]]:
    """Validate the optional ``calibration`` mapping: known keys, scalar values."""
    if raw is None:
        return None
    _check_keys(f"{source}: calibration", raw, set(CALIBRATION_KEYS), ())
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, (datetime.date, datetime.datetime)):
            value = value.isoformat()  # YAML reads an unquoted 2026-11-22 as a date
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ClusterSpecError(f"{source}: calibration.{key}: expected a string or a number, "
                                   f"got {value!r}")
        out[str(key)] = value
    return out


def available_clusters() -> list[str]:
    """Names of the bundled cluster descriptions (``load_cluster`` accepts each)."""
    return sorted(p.stem for p in CLUSTER_DIR.glob("*.yaml"))


def load_cluster(name_or_path: str | Path) -> ClusterSpec:
    """Load a cluster YAML: a path, or a bare name of a bundled description (``johnny``).

    Raises :class:`ClusterNotFoundError` (a ValueError and a FileNotFoundError) naming the
    cluster and the bundled names when there is no such file, :class:`ClusterSpecError` for
    an invalid one.
    """
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CLUSTER_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ClusterNotFoundError(
            f"cluster {str(name_or_path)!r} not found (looked at {path}); bundled clusters: "
            f"{', '.join(available_clusters()) or 'none'} (in {CLUSTER_DIR}), or give a YAML path")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    return cluster_spec_from_dict(data, source=path.name)


def _plain(x: float) -> int | float:
    """An integral float as int (``64`` rather than ``64.0`` in the YAML), else unchanged."""
    return int(x) if float(x).is_integer() else x


class _FlowList(list):
    """A list written in YAML flow style (``[64, 0.06]``)."""


class _FlowDict(dict):
    """A mapping written in YAML flow style (``{a: w0, b: host, gbps: 18.86}``)."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper writing :class:`_FlowList` / :class:`_FlowDict` inline, the rest as blocks."""


_Dumper.add_representer(_FlowList, lambda d, v: d.represent_sequence(
    "tag:yaml.org,2002:seq", v, flow_style=True))
_Dumper.add_representer(_FlowDict, lambda d, v: d.represent_mapping(
    "tag:yaml.org,2002:map", v.items(), flow_style=True))


def _link_dict(obj: LinkSpec | NicSpec, ends: dict[str, Any]) -> _FlowDict:
    """One link / NIC entry; keys at their defaults (count 1, latency 0, no kind) omitted."""
    out = _FlowDict(ends, gbps=_plain(obj.gbps))
    if obj.count != 1:
        out["count"] = obj.count
    if obj.latency_us:
        out["latency_us"] = _plain(obj.latency_us)
    if isinstance(obj, LinkSpec) and obj.kind:
        out["kind"] = obj.kind
    return out


def cluster_to_dict(spec: ClusterSpec) -> dict[str, Any]:
    """The YAML mapping of ``spec``: ``cluster_spec_from_dict(cluster_to_dict(s)) == s``."""
    out: dict[str, Any] = {"name": spec.name}
    if spec.description:
        out["description"] = spec.description
    out.update(nodes=spec.nodes, workers_per_node=spec.workers_per_node,
               gemm_tflops=_FlowDict((k, _plain(v)) for k, v in spec.gemm_tflops.items()))
    if spec.gemm_curve:
        out["gemm_curve"] = {k: _FlowList(_FlowList([_plain(t), _plain(f)]) for t, f in pts)
                             for k, pts in spec.gemm_curve.items()}
    if spec.duplex != "full":
        out["duplex"] = spec.duplex
    out["links"] = [_link_dict(ln, {"a": ln.a, "b": ln.b}) for ln in spec.links]
    if spec.nics:
        out["nics"] = [_link_dict(nic, {"attach": nic.attach}) for nic in spec.nics]
    out["inter_node"] = _FlowDict(switch=spec.inter_switch)
    if spec.calibration is not None:
        out["calibration"] = dict(spec.calibration)
    if spec.link_costs:
        out["link_costs"] = {k: _FlowDict(usd=_plain(c.usd), usd_per_gbps=_plain(c.usd_per_gbps))
                             for k, c in spec.link_costs.items()}
    if spec.memory_gib is not None:
        out["memory_gib"] = _plain(spec.memory_gib)
    return out


def save_cluster(spec: ClusterSpec, path: str | Path, *, comment: str = "") -> None:
    """Write ``spec`` as a cluster YAML (the inverse of :func:`load_cluster`).

    ``comment`` (free text, e.g. how the numbers were measured) becomes ``#`` lines on top.
    The file is validated by loading it back before this returns.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines())
    body = yaml.dump(cluster_to_dict(spec), Dumper=_Dumper, sort_keys=False,
                     default_flow_style=False, width=1 << 20, allow_unicode=True)
    path.write_text(header + body, encoding="utf-8")
    if load_cluster(path) != spec:
        raise ClusterSpecError(f"{path}: written file does not load back as the same spec")
    logger.info("wrote cluster %s to %s", spec.name, path)
