"""The run configuration: one schema of dataclasses, loaded from YAML plus dotted CLI overrides.

``load_config("configs/gpt_moe_tiny.yaml", ["moe.num_experts=8", "train.iters=50"])`` merges the
YAML file and the overrides onto the defaults with OmegaConf (unknown keys and wrong types are
rejected there), then :func:`validate` checks values and cross-field rules. Every error is a
:class:`ConfigError` that names the dotted key, the bad value and the accepted values, and it is
raised before any process group exists, so a bad config never hangs a job.

Each field carries its documentation as an attribute docstring; ``pretrain_gpt_moe.py
--help-config`` prints them (see :func:`field_docs`).
"""


from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .schema import *  # noqa: F401,F403  (the schema is part of this module's interface)
from .schema import Config, ConfigError
from .validation import validate, validate_world

# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            keys.extend(_all_keys(f.type, key + "."))
        elif isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            keys.extend(_all_keys(f.default_factory, key + "."))
    return keys


def _suggest(key: str) -> str:
    match = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def load_config(path: Optional[str | Path], overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated. Raises ConfigError."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        tree = loaded
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value)
    cfg = _merge(tree)
    validate(cfg)
    return cfg


def _merge(tree: dict) -> Config:
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(tree))
    except ConfigKeyError as exc:
        key = str(exc.full_key or exc.key)
        raise ConfigError(f"unknown config key '{key}'{_suggest(key)}") from None
    except ValidationError as exc:
        key = str(exc.full_key or exc.key)
        raise ConfigError(
            f"config key '{key}': value {exc.value!r} has the wrong type"
            f" ({exc.msg.splitlines()[0]})"
        ) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid config: {exc}") from None
    return OmegaConf.to_object(merged)


def to_dict(cfg: Config) -> dict:
    """Plain nested dict of the config."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what is printed at start and saved next to checkpoints)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------
# Documentation
# --------------------------------------------------------------------------------------


def _attribute_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())  # type: ignore
    return docs


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, docstring) for every leaf field, for --help-config."""
    rows = []
    docs = _attribute_docs(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            rows.extend(field_docs(type(value), key + "."))
        else:
            rows.append((key, value, docs.get(f.name, "")))
    return rows
