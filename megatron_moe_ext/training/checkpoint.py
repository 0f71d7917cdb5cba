"""Checkpoints with megatron-core dist_checkpointing.

Layout under ``checkpoint.save``::

    iter_0000020/            dist_checkpointing folder (sharded model + optimizer + common state)
        run_config.yaml      the resolved config of the run that wrote it
        run_info.json        iteration, consumed samples, world size
        COMPLETE             written by rank 0 after every rank finished writing
    latest_checkpointed_iteration.txt   points at the newest COMPLETE folder (atomic rename)

A checkpoint becomes "latest" only after it is complete; resume picks the newest folder with a
COMPLETE marker, so a run killed mid-save resumes from the previous one. Folder checks
(:func:`find_resume_point`) need no process group, so a corrupt or missing checkpoint is
reported before anything can hang.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_moe_ext.config import Config, ConfigError, to_yaml

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
MARKER = "COMPLETE"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


def iter_dir(root: str | Path, iteration: int) -> Path:
    """Folder of one checkpoint."""
    return Path(root) / f"iter_{iteration:07d}"


def complete_iterations(root: str | Path) -> list[int]:
    """Iterations with a complete checkpoint under `root`, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    its = []
    for child in root.iterdir():
        m = _ITER_RE.match(child.name)
        if m and (child / MARKER).is_file():
            its.append(int(m.group(1)))
    return sorted(its)


@dataclass(frozen=True)
class ResumePoint:
    """Where a run resumes from."""

    iteration: int
    """Iteration of the checkpoint."""
    path: Path
    """Its folder."""


def find_resume_point(cfg: Config) -> Optional[ResumePoint]:
    """The newest complete checkpoint to resume from, or None. Raises ConfigError for a
    checkpoint folder that exists but cannot be used (checked before any process group)."""
    ck = cfg.checkpoint
    load = ck.load or ck.save
    if not load:
        return None
    root = Path(load)
    if not root.is_dir():
        same_as_save = ck.save is not None and Path(ck.save).resolve() == root.resolve()
        if ck.load and not same_as_save:
            raise ConfigError(f"checkpoint.load: folder not found: {root}")
        if ck.load:  # Megatron-LM habit: --save X --load X on the first run of a job
            logger.info("checkpoint.load=%s equals checkpoint.save and does not exist yet: "
                        "starting from scratch", root)
        return None
    its = complete_iterations(root)
    if not ck.resume:
        if its and ck.save and Path(ck.save).resolve() == root.resolve():
            raise ConfigError(
                f"checkpoint.save={ck.save} already holds checkpoints (newest iteration "
                f"{its[-1]}) and checkpoint.resume is false: refusing to overwrite them; "
                "resume, or choose another checkpoint.save"
            )
        return None
    partial = [c.name for c in root.iterdir() if _ITER_RE.match(c.name) and not (c / MARKER).is_file()]
    if not its:
        if partial:
            if ck.load:
                raise ConfigError(
                    f"checkpoint.load={root} has only incomplete checkpoints ({', '.join(sorted(partial))}):"
                    " no COMPLETE marker; they were interrupted while saving"
                )
            logger.warning("ignoring incomplete checkpoint folders %s", sorted(partial))
        return None
    path = iter_dir(root, its[-1])
    from megatron_moe_ext.megatron.versions import checkpoint_files_missing

    missing = checkpoint_files_missing(path)  # the layout differs by megatron-core version
    if missing is not None and "megatron-core" in missing:
        raise ConfigError(f"checkpoint {path} cannot be loaded here: {missing}")
    if missing is not None:
        raise ConfigError(
            f"checkpoint {path} is marked COMPLETE but {missing}: "
            "the folder is corrupt; remove it to resume from the previous checkpoint"
        )
    return ResumePoint(its[-1], path)


_LAYOUT_KEYS = ("tensor", "pipeline", "expert")


def check_layout(cfg: Config, point: ResumePoint, world_size: int) -> None:
    """A dp_reshardable checkpoint only loads under the parallel layout that wrote it: say so up
    front instead of failing deep inside dist_checkpointing."""
    saved_cfg = point.path / "run_config.yaml"
    if not saved_cfg.is_file():
        return
    import yaml

    saved = yaml.safe_load(saved_cfg.read_text()) or {}
    sharding = saved.get("checkpoint", {}).get("optimizer_sharding", "dp_reshardable")
    if sharding != "dp_reshardable" or cfg.train.use_distributed_optimizer is False:
        return
    was = {k: saved.get("parallel", {}).get(k) for k in _LAYOUT_KEYS}
    now = {k: getattr(cfg.parallel, k) for k in _LAYOUT_KEYS}
    info = point.path / "run_info.json"
    saved_world = json.loads(info.read_text()).get("world_size") if info.is_file() else None
    if was != now or (saved_world is not None and saved_world != world_size):
        raise ConfigError(
            f"checkpoint {point.path} was saved with checkpoint.optimizer_sharding=dp_reshardable "
            f"under parallel {was} (world size {saved_world}); this run uses {now} "
            f"(world size {world_size}). dp_reshardable optimizer state only loads under the same "
            "layout: resume with the original layout and save with "
            "checkpoint.optimizer_sharding=fully_reshardable to change it"
        )


def _unwrap(module):
    """The model inside the DDP wrapper (checkpoint keys carry no 'module.' prefix, so they do
    not depend on how the model was wrapped)."""
    return getattr(module, "module", module)


def _optimizer_metadata(cfg: Config) -> dict:
    return {"distrib_optim_sharding_type": cfg.checkpoint.optimizer_sharding}


def sharded_state(
    cfg: Config, model: list, optimizer, scheduler, iteration: int, consumed: int, is_loading: bool
) -> dict:
    """The state a checkpoint holds (model, optimizer, scheduler, counters)."""
    assert len(model) == 1, "one model chunk per rank (no virtual pipeline)"
    model_sd = _unwrap(model[0]).sharded_state_dict()
    state: dict[str, Any] = {
        "model": model_sd,
        "iteration": iteration,
        "consumed_samples": consumed,
        "opt_param_scheduler": scheduler.state_dict(),
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_optimizer_metadata(cfg)
        )
    return state


def save_checkpoint(
    cfg: Config, model: list, optimizer, scheduler, iteration: int, consumed: int
) -> Path:
    """Write a checkpoint, mark it complete, update the tracker, prune old ones."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    root = Path(cfg.checkpoint.save)
    path = iter_dir(root, iteration)
    rank = dist.get_rank()
    if rank == 0:
        if (path / MARKER).is_file():
            raise RuntimeError(f"refusing to overwrite the complete checkpoint {path}")
        if path.exists():
            shutil.rmtree(path)  # a partial folder left by an interrupted save
        path.mkdir(parents=True)
    dist.barrier()
    state = sharded_state(cfg, model, optimizer, scheduler, iteration, consumed, is_loading=False)
    dist_checkpointing.save(
        state, str(path), sharded_strategy=get_default_save_sharded_strategy("torch_dist")
    )
    dist.barrier()
    if rank == 0:
        (path / "run_config.yaml").write_text(to_yaml(cfg))
        (path / "run_info.json").write_text(
            json.dumps({"iteration": iteration, "consumed_samples": consumed,
                        "world_size": dist.get_world_size()}) + "\n"
        )
        (path / MARKER).write_text(f"{iteration}\n")
        tmp = root / (TRACKER + ".tmp")
        tmp.write_text(f"{iteration}\n")
        os.replace(tmp, root / TRACKER)
        _prune(root, cfg.checkpoint.keep)
        logger.info("saved checkpoint %s", path)
    dist.barrier()
    return path


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for it in complete_iterations(root)[:-keep]:
        shutil.rmtree(iter_dir(root, it), ignore_errors=True)


def load_checkpoint(
    cfg: Config, point: ResumePoint, model: list, optimizer, scheduler
) -> tuple[int, int]:
    """Load a checkpoint into the model / optimizer / scheduler; returns (iteration, consumed)."""
    from megatron.core import dist_checkpointing

    from megatron_moe_ext.megatron.compat import patch_distributed_optimizer_load

    patch_distributed_optimizer_load()
    if optimizer is not None:
        prepare_optimizer_for_load(optimizer)
    state = sharded_state(cfg, model, optimizer, scheduler, 0, 0, is_loading=True)
    try:
        loaded = dist_checkpointing.load(state, str(point.path))
    except Exception as exc:  # noqa: BLE001 - re-raised with the path and the likely cause
        raise RuntimeError(
            f"could not load checkpoint {point.path}: {type(exc).__name__}: {exc}"
        ) from exc
    _unwrap(model[0]).load_state_dict(loaded["model"])
    if optimizer is not None:
        # megatron-core 0.16 dp_reshardable loading copies into the fp32 main params in place;
        # those are leaves that require grad, so the copy must run without autograd.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        finish_optimizer_load(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    logger.info("resumed from %s", point.path)
    return int(loaded["iteration"]), int(loaded["consumed_samples"])


def _inner_optimizers(optimizer) -> list:
    subs = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [getattr(o, "optimizer", None) for o in subs if getattr(o, "optimizer", None) is not None]


def prepare_optimizer_for_load(optimizer) -> None:
    """Resuming before the optimizer ever stepped: torch Adam has no `step` state yet, and
    megatron-core 0.16's DistributedOptimizer.state_dict() asserts on it. Give every parameter a
    zero step with zero moments (overwritten by the load)."""
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "step" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)


def _saved_adam_steps(tree: Any) -> set[float]:
    """Every `step` recorded in the param_groups of a loaded (possibly chained) optimizer state."""
    found: set[float] = set()
    if isinstance(tree, dict):
        for group in tree.get("param_groups", []) if isinstance(tree.get("param_groups"), list) else []:
            if isinstance(group, dict) and "step" in group:
                found.add(float(group["step"]))
        for value in tree.values():
            found |= _saved_adam_steps(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            found |= _saved_adam_steps(value)
    return found


def finish_optimizer_load(optimizer, loaded_state: Any) -> None:
    """Restore Adam's step count per parameter.

    megatron-core 0.16's DistributedOptimizer (torch Adam, no apex / TE) loses the step on
    resume: load_state_dict gives every parameter one shared `step` tensor, and the dp_reshardable
    parameter-state copy then overwrites it with the value of the load template (0). torch's
    foreach Adam would also increment a shared tensor once per parameter. The resumed run then
    silently diverges (wrong bias correction). The true step is in the saved param_groups: give
    each parameter its own tensor with that value.
    """
    steps = _saved_adam_steps(loaded_state)
    if len(steps) > 1:
        raise RuntimeError(f"checkpoint holds inconsistent optimizer steps {sorted(steps)}")
    saved = next(iter(steps)) if steps else None
    for inner in _inner_optimizers(optimizer):
        for st in inner.state.values():
            step = st.get("step")
            if torch.is_tensor(step):
                value = float(step) if saved is None else saved
                st["step"] = torch.tensor(value, dtype=step.dtype, device=step.device)
