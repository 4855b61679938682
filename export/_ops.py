"""AOT side: the ``paretoq::linear.out`` overload that ExecuTorch's ``to_executorch`` needs.

Its schema is the functional op's (``float bits``, no SymInt) plus ``*, Tensor(a!) out``; the
implementation is the functional op (the PyTorch reference) copied into ``out``.
"""

from __future__ import annotations

import torch

import paretoq_ao  # noqa: F401  - defines the functional paretoq::linear

OUT_SCHEMA = (
    "linear.out(Tensor input, Tensor packed, Tensor scale, float bits, *, Tensor(a!) out) -> Tensor(a!)"
)

_LIB = None


def _linear_out(input, packed, scale, bits, *, out):
    res = torch.ops.paretoq.linear.default(input, packed, scale, bits)
    if out.shape != res.shape:
        out.resize_(res.shape)
    out.copy_(res)
    return out


def register_out_variant() -> None:
    """Define ``paretoq::linear.out`` once per process (idempotent)."""
    global _LIB
    if _LIB is not None or hasattr(torch.ops.paretoq.linear, "out"):
        return
    lib = torch.library.Library("paretoq", "FRAGMENT")
    lib.define(OUT_SCHEMA)
    lib.impl("linear.out", _linear_out, "CompositeExplicitAutograd")
    _LIB = lib


register_out_variant()
