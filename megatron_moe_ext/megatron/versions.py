"""The megatron-core versions this plugin supports, and every difference between them that the
plugin meets, each handled here (one named place) with the versions it applies to.

Supported: megatron-core >= 0.16.1, < 0.20 (tested in CI: 0.16.1 and 0.19.2; the sources of
0.17.0 and 0.18.2 were read for the version each change starts in). :func:`check_supported`
runs first thing in ``training.loop.Trainer`` (before any process group) and raises one
:class:`UnsupportedMegatronCore` naming the range; the entry point prints it and exits 2.

The table :data:`CHANGES` lists what changed and where the plugin answers it; ``docs/
megatron_lm.md`` ("megatron-core versions") repeats it for users.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Optional

from packaging.version import Version

MIN_VERSION = Version("0.16.1")
"""Oldest supported megatron-core (inclusive)."""
MAX_VERSION = Version("0.20")
"""First unsupported megatron-core release (exclusive)."""
SUPPORTED_RANGE = f"megatron-core>={MIN_VERSION},<{MAX_VERSION}"
"""The range as a pip requirement (setup.py states the same)."""


class UnsupportedMegatronCore(RuntimeError):
    """The installed megatron-core is outside :data:`SUPPORTED_RANGE`."""


@dataclass(frozen=True)
class Change:
    """One megatron-core difference the plugin handles."""

    name: str
    """Short id (used by :func:`applies`)."""
    since: str
    """First megatron-core version with the new behaviour."""
    what: str
    """What changed."""
    handled: str
    """Where and how the plugin answers it."""


CHANGES: tuple[Change, ...] = (
    Change("router_is_mtp_layer", "0.17.0",
           "MoELayer builds its router as router(config=, pg_collection=, is_mtp_layer=)",
           "router.TopologyAwareRouter accepts and passes on extra keyword arguments"),
    Change("permute_exact_copies", "0.17.0",
           "drop-free moe_utils.permute takes exactly T * k routed copies (argsort) instead of "
           "every routed copy (masked_select), so a token routed to fewer than top-k experts "
           "without a capacity factor breaks the all-to-all split sizes",
           "router.TopologyAwareRouter: the gate's dropped copies (a node hosting fewer than "
           "top-k experts) need moe.capacity_factor from 0.17 (a clear error otherwise)"),
    Change("moe_spec_partial", "0.18.0",
           "the MoE submodule of layer specs is functools.partial(MoELayer, "
           "submodules=MoESubmodules(...)) instead of ModuleSpec(module=MoELayer, ...)",
           "versions.swap_moe_module / moe_submodules / build_moe handle both forms"),
    Change("mlp_builder_kwargs", "0.18.0",
           "TransformerLayer calls the MLP builder as mlp(config=, pg_collection=, "
           "is_mtp_layer=, name=) (before: build_module(spec, config=, ...) that passed "
           "pg_collection only to the stock MoELayer class)",
           "versions.moe_layer_builder: a partial that forwards the keyword arguments the "
           "MoE class accepts"),
    Change("experts_builder_name", "0.18.0",
           "MoELayer builds experts as experts(n, config, pg_collection=, name=) and shared "
           "experts as shared_experts(config=, pg_collection=, gate=, name=)",
           "nothing to do: the stock builders are kept"),
    Change("triton_import", "0.18.0",
           "import megatron.core.transformer.moe needs triton (moe/paged_stash.py), "
           "not declared by the megatron-core package",
           "requirements-mcore019.txt pins triton; the CPU runtime never runs a kernel"),
    Change("moe_metrics_tracker", "0.18.0",
           "save_to_aux_losses_tracker / clear_aux_losses_tracker / "
           "get_moe_layer_wise_logging_tracker are deprecated aliases of "
           "get_moe_metrics_tracker() (still present in 0.19.2)",
           "versions.record_moe_metric uses the tracker object where it exists"),
    Change("dist_ckpt_common_state", "0.19.0",
           "dist_checkpointing (torch_dist) stores the common state inside the torch_dist "
           "files (.metadata) instead of common.pt; older checkpoints with common.pt still load",
           "training/checkpoint.py: checkpoint_files_missing (a 0.19 checkpoint on an older "
           "version: a clear error)"),
    Change("aux_loss_tp_scaling", "0.19.0",
           "the router's aux-loss / z-loss gradient scale includes the TP x CP size and seq "
           "aux loss counts micro-batch tokens",
           "nothing to do: both implementations run Megatron's own router code"),
)
"""Every megatron-core difference the plugin handles, oldest first."""


@functools.lru_cache(maxsize=None)
def installed_version() -> Version:
    """The installed megatron-core release (local version labels dropped)."""
    try:
        raw = metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        import megatron.core

        raw = megatron.core.__version__
    return Version(Version(raw).base_version)


def version_string() -> str:
    """The installed megatron-core version, for messages."""
    return str(installed_version())


def check_supported(version: Optional[Version] = None) -> Version:
    """Raise :class:`UnsupportedMegatronCore` unless the version is in the supported range."""
    v = installed_version() if version is None else version
    if not MIN_VERSION <= v < MAX_VERSION:
        raise UnsupportedMegatronCore(
            f"megatron-core {v} is not supported: this plugin supports {SUPPORTED_RANGE} "
            f"(tested: 0.16.1 and 0.19.2); install one of those"
        )
    return v


def applies(name: str, version: Optional[Version] = None) -> bool:
    """Whether the change `name` of :data:`CHANGES` is in effect for `version` (installed)."""
    v = installed_version() if version is None else version
    for change in CHANGES:
        if change.name == name:
            return v >= Version(change.since)
    raise KeyError(name)


# --------------------------------------------------------------------------------------
# moe_spec_partial / mlp_builder_kwargs: the MoE submodule of a layer spec
# --------------------------------------------------------------------------------------


def moe_submodules(mlp: Any):
    """The MoESubmodules of a layer spec's MLP entry if it is an MoE layer, else None
    (ModuleSpec up to 0.17, functools.partial from 0.18)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(mlp, ModuleSpec):
        ok = isinstance(mlp.module, type) and issubclass(mlp.module, MoELayer)
        subs = mlp.submodules
    elif isinstance(mlp, functools.partial):
        cls = _partial_class(mlp)
        ok = cls is not None and issubclass(cls, MoELayer)
        subs = mlp.keywords.get("submodules")
    else:
        return None
    return subs if ok and isinstance(subs, MoESubmodules) else None


def moe_module_class(mlp: Any) -> Optional[type]:
    """The MoE layer class a layer spec's MLP entry builds (None: not an MoE entry)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if moe_submodules(mlp) is None:
        return None
    return mlp.module if isinstance(mlp, ModuleSpec) else _partial_class(mlp)


def _partial_class(p: functools.partial) -> Optional[type]:
    if isinstance(p.func, type):
        return p.func
    return p.keywords.get("moe_cls") if p.func is _construct_moe else None


def _construct_moe(*, moe_cls: type, **kwargs: Any):
    """Build `moe_cls` with the keyword arguments it accepts. A keyword it does not accept is
    dropped only when it carries its default meaning (``name``: module naming;
    ``is_mtp_layer=False``); anything else is an error, never silently lost."""
    params = inspect.signature(moe_cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for key in [k for k in kwargs if k not in params]:
            value = kwargs.pop(key)
            if not (key == "name" or (key == "is_mtp_layer" and not value)):
                raise TypeError(f"{moe_cls.__name__} cannot take {key}={value!r} "
                                f"(megatron-core {version_string()})")
    return moe_cls(**kwargs)


def moe_layer_builder(moe_cls: type, submodules: Any, **params: Any) -> functools.partial:
    """A 0.18+ style MLP builder for `moe_cls`: ``builder(config=, pg_collection=,
    is_mtp_layer=, name=)`` builds ``moe_cls(submodules=..., **params, ...)``."""
    return functools.partial(_construct_moe, moe_cls=moe_cls, submodules=submodules, **params)


def swap_moe_module(mlp: Any, moe_cls: type, params: dict[str, Any],
                    router: Optional[Callable] = None) -> Any:
    """A copy of a layer spec's MoE MLP entry that builds `moe_cls` (with extra init `params`)
    and, if given, the `router` builder; the same form (ModuleSpec or partial) as the input.
    An entry that is not an MoE layer is returned unchanged."""
    import copy

    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec

    subs = moe_submodules(mlp)
    if subs is None:
        return mlp
    subs = copy.copy(subs)
    if router is not None:
        subs.router = router
    stock = moe_cls is MoELayer
    if isinstance(mlp, ModuleSpec):
        new = copy.copy(mlp)
        new.submodules = subs
        if not stock:
            new.module = moe_cls
            new.params = dict(mlp.params or {}, **params)
        return new
    keywords = {k: v for k, v in mlp.keywords.items() if k not in ("submodules", "moe_cls")}
    if stock:
        return functools.partial(MoELayer, *mlp.args, **dict(keywords, submodules=subs))
    return moe_layer_builder(moe_cls, subs, **dict(keywords, **params))


def build_moe(mlp: Any, config: Any, pg_collection: Any):
    """Build a layer spec's MoE MLP entry on its own (outside a TransformerLayer)."""
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    if isinstance(mlp, ModuleSpec):
        return build_module(mlp, config=config, pg_collection=pg_collection)
    return mlp(config=config, pg_collection=pg_collection)


# --------------------------------------------------------------------------------------
# dist_ckpt_common_state
# --------------------------------------------------------------------------------------


def checkpoint_files_missing(path: Any) -> Optional[str]:
    """None if the dist_checkpointing folder `path` holds the files the installed version needs
    to load it; else what is missing, phrased for the user."""
    from pathlib import Path

    p = Path(path)
    if not (p / "metadata.json").is_file():
        return "metadata.json is missing"
    if (p / "common.pt").is_file():
        return None  # every version loads the common.pt layout
    if not (p / ".metadata").is_file():
        return "common.pt and the torch_dist .metadata are missing"
    if not applies("dist_ckpt_common_state"):
        return (f"it stores its common state in the torch_dist files (written by megatron-core "
                f">= 0.19) and megatron-core {version_string()} needs common.pt; load it with "
                f"megatron-core >= 0.19")
    return None


# --------------------------------------------------------------------------------------
# moe_metrics_tracker
# --------------------------------------------------------------------------------------


def record_moe_metric(name: str, value: Any, layer_number: int, num_layers: int) -> None:
    """Add a per-layer value to Megatron's MoE metrics tracker (the aux-loss tracker)."""
    from megatron.core.transformer.moe import moe_utils

    tracker = getattr(moe_utils, "get_moe_metrics_tracker", None)
    if tracker is not None:  # 0.18+
        tracker().record(name=name, value=value, layer_number=layer_number,
                         num_layers=num_layers)
    else:
        moe_utils.save_to_aux_losses_tracker(name, value, layer_number, num_layers)


# --------------------------------------------------------------------------------------
# Options a version cannot do: config errors before any process group
# --------------------------------------------------------------------------------------

OPTION_FIELDS: tuple[tuple[str, str, Callable[[Any], bool]], ...] = (
    ("moe.router.enable_expert_bias", "moe_router_enable_expert_bias", bool),
    ("moe.router.num_groups", "moe_router_num_groups", lambda v: v is not None),
    ("moe.router.group_topk", "moe_router_group_topk", lambda v: v is not None),
    ("moe.shared_expert_ffn_hidden_size", "moe_shared_expert_intermediate_size",
     lambda v: v is not None),
)
"""(config key, TransformerConfig field it needs, whether the value uses the feature)."""


def validate_config(cfg: Any, transformer_config: Optional[type] = None) -> None:
    """ConfigError for an option the installed megatron-core cannot do (its TransformerConfig
    lacks the field). Every supported version (0.16.1 .. 0.19.2) has all of these and accepts
    every moe.router.load_balancing_type of the schema (aux_loss, seq_aux_loss,
    global_aux_loss, sinkhorn, none; checked in their TransformerConfig.__post_init__)."""
    import dataclasses

    from megatron_moe_ext.config import ConfigError

    if transformer_config is None:
        from megatron.core.transformer.transformer_config import TransformerConfig

        transformer_config = TransformerConfig
    fields = {f.name for f in dataclasses.fields(transformer_config)}
    for key, field, used in OPTION_FIELDS:
        value = _dotted(cfg, key)
        if used(value) and field not in fields:
            raise ConfigError(f"config key '{key}': {value!r} needs megatron-core's {field}, "
                              f"which megatron-core {version_string()} does not have")


def _dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def markdown_table() -> str:
    """The change table of docs/megatron_lm.md (a test keeps the two equal)."""
    lines = ["| since | what changed in megatron-core | how the plugin handles it |",
             "|---|---|---|"]
    for c in CHANGES:
        lines.append(f"| {c.since} | {c.what} | {c.handled} |")
    return "\n".join(lines) + "\n"
