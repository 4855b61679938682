"""AOT side: the ``.out`` overloads of ``paretoq::linear`` / ``linear_8da`` and of their blocked16
twins ``linear_b16`` / ``linear_8da_b16`` (ops.py) that ExecuTorch's ``to_executorch`` needs.

Their schemas are the functional ops' (``float bits``, no SymInt) plus ``*, Tensor(a!) out``; the
implementation is the functional op (its backend or reference) copied into ``out``.
"""

from __future__ import annotations

import torch

import paretoq_ao  # noqa: F401  - defines the functional ops

OPS = {
    "linear": "{op}.out(Tensor input, Tensor packed, Tensor scale, float bits, *, Tensor(a!) out) -> Tensor(a!)",
    "linear_8da": "{op}.out(Tensor input, Tensor packed, Tensor scale, float bits, *, Tensor(a!) out) -> Tensor(a!)",
    "linear_b16": "{op}.out(Tensor input, Tensor codes, Tensor scales, float bits, int out_features, *, "
                  "Tensor(a!) out) -> Tensor(a!)",
    "linear_8da_b16": "{op}.out(Tensor input, Tensor codes, Tensor scales, float bits, int out_features, *, "
                      "Tensor(a!) out) -> Tensor(a!)",
}

_LIB = None


def _out_impl(op: str):
    functional = getattr(torch.ops.paretoq, op).default

    def impl(*args, out):
        res = functional(*args)
        if out.shape != res.shape:
            out.resize_(res.shape)
        out.copy_(res)
        return out

    return impl


def register_out_variant() -> None:
    """Define the ``.out`` overloads of the four ops once per process (idempotent)."""
    global _LIB
    if _LIB is not None or hasattr(torch.ops.paretoq.linear, "out"):
        return
    lib = torch.library.Library("paretoq", "FRAGMENT")
    for op, schema in OPS.items():
        lib.define(schema.format(op=op))
        lib.impl(f"{op}.out", _out_impl(op), "CompositeExplicitAutograd")
    _LIB = lib


register_out_variant()
