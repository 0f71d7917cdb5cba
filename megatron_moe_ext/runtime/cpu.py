"""CPU runtime for stock megatron-core: run the real model / DDP / optimizer / checkpointing
on a CUDA-less machine with the gloo backend.

This module is switched on by :func:`megatron_moe_ext.runtime.device.setup_runtime` only when
the resolved device is ``cpu`` (``runtime.device: cpu``, or ``auto`` on a machine without
CUDA). It is never activated on a GPU run. Every patch below names, in one line, the
megatron-core behaviour it answers and the versions it was seen in; the list mirrors
``docs/cpu_runtime.md`` and ``../shared/reference/megatron-core-on-cpu.md``.

Two mechanisms are used:

* :class:`_CudaToCpuMode`, a ``TorchFunctionMode`` that rewrites ``device='cuda'`` arguments,
  ``Tensor.cuda()`` and ``Tensor.to('cuda')`` to the CPU, and answers
  ``Tensor.type() == 'torch.cuda.FloatTensor'`` checks. One general mechanism instead of
  rewriting each hard-coded ``'cuda'`` string in megatron-core.
* Small attribute patches on ``torch.cuda`` (device, streams, events, RNG) and on a few
  megatron-core functions that have bugs when transformer_engine / apex are absent.

All patches are idempotent and can be undone with :func:`deactivate` (used by tests).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_saved: list[tuple[Any, str, Any]] = []
_mode: "_CudaToCpuMode | None" = None
_active = False


# --------------------------------------------------------------------------------------
# Device rewriting
# --------------------------------------------------------------------------------------


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU (megatron-core 0.16: optimizer.py, clip_grads.py,
    utils.py, grad_scaler.py, schedules.py, rerun_state_machine.py, param_and_grad_buffer.py
    allocate with a hard-coded ``device='cuda'``; language_module.py calls ``.cuda()``;
    clip_grads.py / optimizer.py / distrib_optimizer.py assert ``type()=='torch.cuda.FloatTensor'``).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D401
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.pin_memory:
            return args[0]
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs = dict(kwargs, device=_CPU)
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------
# torch.cuda stand-ins
# --------------------------------------------------------------------------------------


class _NullStream:
    """Stand-in for ``torch.cuda.Stream`` (token_dispatcher.py's DtoH stream, shared-expert
    overlap, p2p and timers create CUDA streams unconditionally in megatron-core 0.16)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_NullEvent":
        return _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NullStream)

    def __hash__(self) -> int:
        return 0


class _NullEvent:
    """Stand-in for ``torch.cuda.Event``: CPU work is already ordered by program order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


_NULL_STREAM = _NullStream()


def _cuda_manual_seed(seed: int) -> None:
    # torch.manual_seed() calls torch.cuda.manual_seed_all(); seeding the CPU generator
    # directly (not through torch.manual_seed) avoids infinite recursion.
    torch.default_generator.manual_seed(int(seed))


def _get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(state)


_CUDA_STANDINS: dict[str, Any] = {
    # megatron-core passes torch.cuda.current_device() as `device=` (~90 call sites).
    "current_device": lambda: _CPU,
    "set_device": lambda *a, **k: None,
    "device_count": lambda: 0,
    "Stream": _NullStream,
    "Event": _NullEvent,
    "stream": lambda *a, **k: contextlib.nullcontext(),
    "current_stream": lambda *a, **k: _NULL_STREAM,
    "default_stream": lambda *a, **k: _NULL_STREAM,
    "synchronize": lambda *a, **k: None,
    "empty_cache": lambda: None,
    "memory_allocated": lambda *a, **k: 0,
    "max_memory_allocated": lambda *a, **k: 0,
    "memory_reserved": lambda *a, **k: 0,
    "max_memory_reserved": lambda *a, **k: 0,
    "reset_peak_memory_stats": lambda *a, **k: None,
    # The tensor-parallel RNG tracker and the rerun state machine fork the CUDA generator;
    # on CPU the CPU generator plays its role (dropout draws from it).
    "manual_seed": _cuda_manual_seed,
    "manual_seed_all": _cuda_manual_seed,
    "get_rng_state": _get_rng_state,
    "set_rng_state": _set_rng_state,
}


def _patch(owner: Any, name: str, value: Any) -> None:
    _saved.append((owner, name, getattr(owner, name, _MISSING)))
    setattr(owner, name, value)


_MISSING = object()


# --------------------------------------------------------------------------------------
# megatron-core specific patches
# --------------------------------------------------------------------------------------


def _cpu_maybe_move_tensor_to_cpu(
    tensor: Any, as_numpy: bool = False, record_stream: bool = False
) -> Any:
    """CPU twin of moe_utils.maybe_move_tensor_to_cpu: also honours ``as_numpy`` for tensors that
    already live on the CPU, so all-to-all split sizes reach gloo as numpy, not tensors."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _patch_megatron() -> None:
    """Patches inside megatron-core; imported lazily so the runtime can be set up first."""
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # megatron-core 0.16.1 moe_utils.py: `te_general_gemm` is undefined without transformer_engine,
    # so every router forward raises NameError (unless router dtype is fp64). Fixed in 0.17
    # (defined as None there): the guard makes this a no-op.
    if not hasattr(moe_utils, "te_general_gemm"):
        _patch(moe_utils, "te_general_gemm", None)
    # megatron-core 0.16.1 .. 0.19.2 token_dispatcher.py: split sizes are moved to host (numpy)
    # only for CUDA tensors; on CPU they reach all_to_all_single as tensors and gloo raises.
    _patch(token_dispatcher, "maybe_move_tensor_to_cpu", _cpu_maybe_move_tensor_to_cpu)
    # megatron-core 0.16 .. 0.19 tensor_parallel/random.py: reads torch.cuda.default_generators.
    _patch(tp_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _patch(tp_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    # megatron-core 0.16 jit.py: jit_fuser is torch.compile; compiling C++ on CPU costs ~17 s on
    # the first bf16 step for no gain at these sizes.
    import torch._dynamo

    _patch(torch._dynamo.config, "disable", True)
    _patch_checkpoint_results_queue()


def _patch_checkpoint_results_queue() -> None:
    """megatron-core 0.16 .. 0.19 dist_checkpointing/strategies/filesystem_async.py: the write
    results of a save travel through a queue served by a *spawned* multiprocessing Manager
    (module global ``_results_queue``, made on first use). Unpickling the results there imports
    torch in a fresh interpreter: 2.6 s per process on the first save, on a 2-core machine as long
    as the rest of a small run. This runtime only saves synchronously (``dist_checkpointing.save``
    runs the writer in the calling process and reads the queue right after), so an in-process
    queue carries the same objects. Async saves (a persistent writer process) are not offered."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", _MISSING) is None:
        _patch(filesystem_async, "_results_queue", queue.Queue())


def activate() -> None:
    """Switch the CPU runtime on for this process (idempotent)."""
    global _mode, _active
    if _active:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "the CPU runtime must not be activated on a machine with CUDA; "
            "set runtime.device: cuda (or auto)"
        )
    for name, value in _CUDA_STANDINS.items():
        _patch(torch.cuda, name, value)
    _mode = _CudaToCpuMode()
    _mode.__enter__()
    _active = True
    _patch_megatron()
    logger.debug("CPU runtime for megatron-core activated")


def deactivate() -> None:
    """Undo every patch (tests use this to prove a patch is needed)."""
    global _mode, _active
    while _saved:
        owner, name, value = _saved.pop()
        if value is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, value)
    if _mode is not None:
        _mode.__exit__(None, None, None)
        _mode = None
    _active = False


def is_active() -> bool:
    """Whether the CPU runtime is switched on in this process."""
    return _active


__all__ = ["activate", "deactivate", "is_active"]
