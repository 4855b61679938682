"""Backends of the ParetoQ linear ops, in a registry that the backends fill in themselves.

``paretoq::linear`` (float activations) and ``paretoq::linear_8da`` (dynamic int8 activations, one
scale per token) validate their arguments once, then run the first registered backend, by
priority, that serves the call's device and says yes to it (``supports(call) is None``); the
plain PyTorch reference of ops.py serves everything else and is the oracle of every test.

Backends live in their own packages and announce themselves through the ``paretoq_ao.backends``
entry-point group (pyproject.toml): on the first op call each entry point's ``activate()`` is
called once and registers its ``LinearBackend`` with ``register_backend``. Shipped:

* ``cpu``    (``paretoq_ao.export.cpu_backend``): the C++ kernel library (AVX2 / AVX-512 / NEON),
  built on first use against the installed torch; every format, group layout and M;
* ``triton`` (``paretoq_ao.triton_kernels.backend``): the Triton kernels on CUDA (and on CPU
  tensors while ``TRITON_INTERPRET=1``, which runs them in Triton's interpreter); float
  activations only.

Never silently slow: when a call that has a backend for its device falls back to the reference,
one warning per reason says why and how to fix it. ``disabled(names)`` turns backends off for a
block (tests, debugging); ``PARETOQ_AO_BACKENDS=reference`` (or a comma-separated list of the
backends to allow), read when the first op runs, does so for a process.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

from .formats import BitFormat

__all__ = ["LinearCall", "LinearBackend", "register_backend", "registered_backends", "select",
           "disabled", "trace_key", "BackendFallbackWarning", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "paretoq_ao.backends"


class BackendFallbackWarning(UserWarning):
    """A ParetoQ linear ran the slow PyTorch reference although a backend exists for its device."""


@dataclass(frozen=True)
class LinearCall:
    """One call of the ops, arguments already validated (shapes, dtypes, devices)."""

    input: torch.Tensor
    packed: torch.Tensor
    scale: torch.Tensor
    fmt: BitFormat
    int8_act: bool

    @property
    def op(self) -> str:
        return "paretoq::linear_8da" if self.int8_act else "paretoq::linear"


@dataclass(frozen=True)
class LinearBackend:
    """``supports(call)`` returns None when ``run(call)`` serves the call, else the reason it
    does not; ``quiet(reason)`` says whether falling back for that reason is expected (no
    warning: e.g. a CPU tensor offered to the Triton backend outside the interpreter).

    ``graph_op(call)``, optional: what a ``torch.compile`` graph calls for a call this backend
    serves — an operator with its own (C++) kernel and a fake implementation, so the compiled
    graph reaches the kernel with no Python in between. Without it (None) the graph calls the
    ``paretoq::`` custom op, whose Python body picks a backend on every call. Either way the backend
    is chosen when the graph is traced (see ops.traced_call_ok). ``ready()``: whether the backend
    can run in this process at all (its library built and loaded); with the registry's on/off
    state it is part of the key compiled graphs are cached under (``trace_key``)."""

    name: str
    device_types: Sequence[str]
    priority: int
    supports: Callable[[LinearCall], Optional[str]]
    run: Callable[[LinearCall], torch.Tensor]
    quiet: Callable[[str], bool] = lambda reason: False
    graph_op: Optional[Callable[[LinearCall], torch.Tensor]] = None
    ready: Callable[[], bool] = lambda: True


_lock = threading.Lock()
_backends: List[LinearBackend] = []
_activated = False
_disabled: set = set()
_warned: set = set()
_env_allowed: Optional[set] = None     # PARETOQ_AO_BACKENDS, read on activation
_by_device: Dict[str, List[LinearBackend]] = {}  # device type -> allowed backends, by priority


def register_backend(backend: LinearBackend) -> None:
    """Add (or replace, by name) a backend."""
    with _lock:
        _backends[:] = [b for b in _backends if b.name != backend.name] + [backend]
        _backends.sort(key=lambda b: -b.priority)
        _by_device.clear()


def _activate() -> None:
    global _activated, _env_allowed
    if _activated:
        return
    with _lock:
        if _activated:
            return
        _activated = True
        env = os.environ.get("PARETOQ_AO_BACKENDS")
        _env_allowed = None if env is None else {x.strip() for x in env.split(",")}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()()


def registered_backends() -> List[LinearBackend]:
    _activate()
    return list(_backends)


def _allowed(name: str) -> bool:
    return name not in _disabled and (_env_allowed is None or name in _env_allowed)


def _candidates(device_type: str) -> List[LinearBackend]:
    found = _by_device.get(device_type)
    if found is None:
        found = [b for b in _backends if device_type in b.device_types and _allowed(b.name)]
        _by_device[device_type] = found
    return found


@contextlib.contextmanager
def disabled(names) -> Iterator[None]:
    """Turn the named backends off inside a ``with`` block (``"all"``: every backend)."""
    names = {names} if isinstance(names, str) else set(names)
    if "all" in names:
        names = {b.name for b in registered_backends()}
    added = names - _disabled
    _disabled.update(added)
    _by_device.clear()
    try:
        yield
    finally:
        _disabled.difference_update(added)
        _by_device.clear()


def _warn_once(backend: LinearBackend, call: LinearCall, reason: str) -> None:
    key = (backend.name, reason)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"{call.op} on {call.input.device.type}: the {backend.name!r} backend does not serve this call "
        f"({reason}); it runs the plain PyTorch reference, which dequantizes the whole weight on every "
        f"call (slow)", BackendFallbackWarning, stacklevel=4)


def trace_key(device_type: str) -> str:
    """The backends a graph traced now for ``device_type`` may call (allowed and ready, by
    priority; "+op" where the graph calls the backend's own op), e.g. "triton,cpu+op": what the
    packed weight's ``_stable_hash_for_caching`` adds, so that torch.compile's on-disk cache never
    hands a graph that calls one backend's operator to a process (or a ``disabled`` block) where
    that backend is off or missing."""
    _activate()
    return ",".join(b.name + ("+op" if b.graph_op is not None else "")
                    for b in _candidates(device_type) if b.ready())


def select(call: LinearCall) -> Optional[LinearBackend]:
    """The backend that runs ``call`` (None: the reference)."""
    _activate()
    declined: Dict[str, str] = {}
    for b in _candidates(call.input.device.type):
        reason = b.supports(call)
        if reason is None:
            return b
        if not b.quiet(reason):
            declined[b.name] = reason
    for b in _backends:
        if b.name in declined:
            _warn_once(b, call, declined[b.name])
            break
    return None
