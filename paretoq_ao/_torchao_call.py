"""Recognising, from inside our handler, the torchao ``quantize_`` call that is applying a config.

torchao hands a config's handler one module at a time and never the model, so a direct
``torchao.quantization.quantize_(model, ParetoQ...Config(...))`` could not check the whole model
before changing it. To give direct calls the guarantees of ``paretoq_ao.quantize`` anyway, the
handler looks for that call among its callers and reads its arguments by their *public* parameter
names. Nothing private of torchao is used: only the public function ``quantize_`` (unwrapped if a
release decorates it) and its signature (the names ``model``, ``config``, ``filter_fn`` and the
default ``filter_fn``). If a torchao release changes that signature, ``find_call`` returns None,
one warning says so, and direct calls get the per-layer guarantee only (README, "What a direct
quantize_ call guarantees"); ``paretoq_ao.quantize`` does not use this module at all.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from functools import lru_cache
from typing import Callable, NamedTuple, Optional

from torch import nn

_PARAMETERS = ("model", "config", "filter_fn")


class QuantizeCall(NamedTuple):
    frame_id: int
    model: nn.Module
    filter_fn: Optional[Callable]
    default_filter: Optional[Callable]  # quantize_'s documented default filter_fn


@lru_cache(maxsize=1)
def _signature():
    """(code object of quantize_, its default filter_fn), or None if the signature is not the one
    this module reads."""
    from torchao.quantization import quantize_

    fn = inspect.unwrap(quantize_)
    code = getattr(fn, "__code__", None)
    params = inspect.signature(fn).parameters
    if code is None or any(name not in params for name in _PARAMETERS):
        return None
    default = params["filter_fn"].default
    return code, (None if default is inspect.Parameter.empty else default)


_WARNED = []


def _warn_unsupported() -> None:
    if not _WARNED:
        _WARNED.append(True)
        warnings.warn("paretoq_ao: this torchao's quantize_ does not have the signature "
                      "quantize_(model, config, filter_fn, ...); direct quantize_ calls validate and "
                      "convert each layer on its own (no whole-model check, the output head is "
                      "converted if the filter selects it). Use paretoq_ao.quantize(model, config) "
                      "for the whole-model guarantees.", stacklevel=3)


def find_call(config) -> Optional[QuantizeCall]:
    """The ``quantize_`` call applying ``config`` to a model, if the handler runs under one."""
    sig = _signature()
    if sig is None:
        _warn_unsupported()
        return None
    code, default = sig
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            loc = frame.f_locals
            if loc.get("config") is not config:  # e.g. torchao's FqnToConfig applying an inner config
                return None
            return QuantizeCall(id(frame), loc["model"], loc.get("filter_fn"), default)
        frame = frame.f_back
    return None
