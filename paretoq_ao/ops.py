"""The ParetoQ linear operators: every packed linear layer runs through one of these two ops.

``paretoq::linear(Tensor input, Tensor packed, Tensor scale, float bits) -> Tensor``
    float activations: ``input @ dequantize(packed, scale).T`` (the packed model's semantics);
``paretoq::linear_8da(Tensor input, Tensor packed, Tensor scale, float bits) -> Tensor``
    dynamic int8 activations: each token (row of ``input``) quantized to int8 with one scale
    ``absmax / 127`` (round half to even), integer dot products per scale group (the arithmetic of
    the C++ kernels, ``export/csrc/paretoq_kernels.h``); a faster, slightly less accurate choice
    on CPUs, like torchao's 8da4w. A token holding NaN/Inf is computed with float activations.

* ``input``  [..., K] floating activations;
* ``packed`` uint8 [N, packing.packed_row_bytes(K, bits)] in the layout of packing.py;
* ``scale``  [N, G] with G dividing K (G = 1: per row; else groups of K / G columns);
* ``bits``   1, 1.58, 2, 3 or 4;
* returns [..., N] in the input's dtype.

``paretoq::linear_b16`` / ``paretoq::linear_8da_b16(Tensor input, Tensor codes, Tensor scales, float bits,
int out_features) -> Tensor`` are the same two ops on weights in the blocked16 order of packing.py
(``block16``: codes uint8 [Np / 16, Rp / 4, 64], scales float32 [Np / 16, G, 16]), the order
ExecuTorch programs store, in which the C++ kernels read each 16-row block as one stream. In
PyTorch they undo the blocking and run the ops above (exact, not fast: they exist for export).

K is taken from ``input``: the ops reject a K whose packed row length differs, but cannot tell
K values that round up to the same number of bytes apart (e.g. K = 5..8 at 1 bit). The packed
weight subclass, which knows its K, checks it before calling the op.

Each call is validated once (``check_linear_args``) and then run by the backend that the
registry of backends.py picks for it (the C++ CPU kernels, the Triton kernels on CUDA, ...), or by
the plain PyTorch reference below. ``torch.export`` sees one opaque op (its fake implementation
gives shapes); the ExecuTorch kernel library implements both schemas. A ``torch.compile`` graph of
an inference call instead calls the chosen backend's own operator where it has one
(``graph_linear``: e.g. ``paretoq_cpu::linear``, the C++ kernels with no Python per call); the
backend is then chosen when the graph is traced, so ``backends.disabled`` or a new backend takes
effect in a compiled model after ``torch.compiler.reset()`` (a new trace).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends
from .formats import SCALE_EPS, get_format
from .packing import LEGACY_LAYOUTS, legacy_row_bytes, packed_row_bytes, unblock16, unpack_codes
from .quant import dequantize_codes

__all__ = ["linear", "linear_8da", "linear_b16", "linear_8da_b16", "check_linear_args", "reference_linear", "reference_linear_8da",
           "triton_interpreting", "run_linear", "eager_call_ok",
           "traced_call_ok", "graph_linear"]


def check_linear_args(input: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits):
    """Validate the ops' arguments; errors name the shapes and dtypes involved."""
    fmt = get_format(bits)
    if not input.dtype.is_floating_point:
        raise TypeError(f"paretoq::linear: input must be floating point, got {input.dtype}")
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(
            f"paretoq::linear: packed must be a 2-D uint8 tensor, got {packed.dtype} "
            f"of shape {tuple(packed.shape)}"
        )
    if input.dim() < 1:
        raise ValueError("paretoq::linear: input must have at least one dimension")
    k = input.shape[-1]
    want = packed_row_bytes(k, fmt)
    if packed.shape[1] != want:
        legacy = ""
        if fmt.storage == "trits5" and packed.shape[1] == legacy_row_bytes(k, fmt):
            legacy = (f"; {packed.shape[1]} bytes is the 2-bit-field ternary of the old layout "
                      f"{LEGACY_LAYOUTS[0]}: repack it with paretoq_ao.packing.from_legacy (a .pte exported "
                      f"with it: export it again)")
        raise ValueError(
            f"paretoq::linear: input has K={k} features but the packed {fmt} weight of shape "
            f"{tuple(packed.shape)} holds {packed.shape[1]} bytes per row "
            f"(K={k} needs {want}){legacy}"
        )
    if not scale.dtype.is_floating_point:
        raise TypeError(f"paretoq::linear: scale must be floating point, got {scale.dtype}")
    if scale.dim() != 2 or scale.shape[0] != packed.shape[0] or scale.shape[1] == 0 or k % scale.shape[1]:
        raise ValueError(
            f"paretoq::linear: scale of shape {tuple(scale.shape)} does not fit a weight of "
            f"{packed.shape[0]} rows and K={k} (expected [N, 1] or [N, K // group_size])"
        )
    if input.device != packed.device or scale.device != packed.device:
        raise ValueError(
            f"paretoq::linear: tensors on different devices: input {input.device}, "
            f"packed {packed.device}, scale {scale.device}"
        )
    return fmt


def reference_linear(input, packed, scale, bits) -> torch.Tensor:
    """Plain PyTorch: unpack -> dequantize (scale dtype) -> cast -> matmul."""
    codes = unpack_codes(packed, input.shape[-1], bits)
    weight = dequantize_codes(codes, scale, bits).to(input.dtype)
    return F.linear(input, weight)


def reference_linear_8da(input: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits) -> torch.Tensor:
    """Plain PyTorch of the int8-activation arithmetic (float64 sums): per token d = absmax / 127,
    q = round(x / d) clamped to +-127, then ``d * step * sum_g max(s_g, eps) * (dot_g - zero * sum_g q)``.
    Tokens holding NaN/Inf use float activations, like the kernels."""
    fmt = get_format(bits)
    k = input.shape[-1]
    x = input.reshape(-1, k).float()
    d = x.abs().amax(dim=1, keepdim=True) / 127.0
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.where(d > 0, torch.round(x / safe), torch.zeros_like(x)).clamp(-127, 127).double()
    codes = unpack_codes(packed, k, bits).double()
    g = scale.shape[1]
    gs = k // g
    dots = torch.einsum("mgk,ngk->mng", q.view(-1, g, gs), codes.view(-1, g, gs))
    qsum = q.view(-1, g, gs).sum(-1)  # [M, G]
    s = scale.float().clamp_min(SCALE_EPS).double()
    out = ((dots - fmt.zero * qsum[:, None, :]) * s[None]).sum(-1) * fmt.step * d.double()
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        out[bad] = reference_linear(x[bad], packed, scale, bits).double()
    return out.to(input.dtype).reshape(*input.shape[:-1], packed.shape[0])


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton for its CPU interpreter (the values Triton reads
    as true: 1, true, yes, on)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def eager_call_ok(input: torch.Tensor) -> bool:
    """True when a call may skip the custom-op wrapper and run ``run_linear`` directly: plain eager
    inference (a plain tensor, nothing tracing or compiling, no gradient to record). The result is
    the same; it saves the wrapper's overhead (about 15 us per call)."""
    return (type(input) is torch.Tensor and not torch.compiler.is_compiling()
            and not (input.requires_grad and torch.is_grad_enabled()))


def _chosen(input, packed, scale, bits, int8_act: bool):
    """(call, backend or None): the arguments validated once, and the backend that serves them."""
    fmt = check_linear_args(input, packed, scale, bits)
    call = backends.LinearCall(input, packed, scale, fmt, int8_act)
    return call, backends.select(call)


def run_linear(input, packed, scale, bits, int8_act: bool) -> torch.Tensor:
    """What both ops compute: validate once, then the chosen backend or the reference."""
    call, backend = _chosen(input, packed, scale, bits, int8_act)
    if backend is not None:
        return backend.run(call)
    return (reference_linear_8da if int8_act else reference_linear)(input, packed, scale, bits)


def traced_call_ok(input: torch.Tensor) -> bool:
    """True while ``torch.compile`` (not ``torch.export``, whose programs must name the ``paretoq::``
    ops) traces a call that records no gradient for its input: its graph may call the selected
    backend's own operator (``graph_linear``)."""
    return (torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and not (input.requires_grad and torch.is_grad_enabled()))


def graph_linear(input, packed, scale, bits, int8_act: bool) -> torch.Tensor:
    """What a compiled graph calls (see ``traced_call_ok``): the selected backend's ``graph_op``, or
    the ``paretoq::`` custom op where the backend has none (or no backend serves the call)."""
    call, backend = _chosen(input, packed, scale, bits, int8_act)
    if backend is not None and backend.graph_op is not None:
        return backend.graph_op(call)
    return (linear_8da if int8_act else linear)(input, packed, scale, bits)


@torch.library.custom_op("paretoq::linear", mutates_args=())
def linear(input: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits: float) -> torch.Tensor:
    return run_linear(input, packed, scale, bits, False)


@torch.library.custom_op("paretoq::linear_8da", mutates_args=())
def linear_8da(input: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits: float) -> torch.Tensor:
    return run_linear(input, packed, scale, bits, True)


def _fake(input, packed, scale, bits):
    check_linear_args(input, packed, scale, bits)
    return input.new_empty((*input.shape[:-1], packed.shape[0]))


def _setup_context(ctx, inputs, output):
    x, packed, scale, bits = inputs
    ctx.save_for_backward(packed, scale)
    ctx.bits = bits
    ctx.in_features = x.shape[-1]


def _backward(ctx, grad):
    # Gradient for the activations only (packed weights are frozen): grad @ dequantize(W). The int8
    # op gets the same (straight-through) gradient.
    packed, scale = ctx.saved_tensors
    codes = unpack_codes(packed, ctx.in_features, ctx.bits)
    weight = dequantize_codes(codes, scale, ctx.bits).to(grad.dtype)
    return grad @ weight, None, None, None


for _op in (linear, linear_8da):
    _op.register_fake(_fake)
    _op.register_autograd(_backward, setup_context=_setup_context)


def _unblocked(input, codes, scales, bits, out_features):
    if input.dim() < 1:
        raise ValueError("paretoq::linear_b16: input must have at least one dimension")
    return unblock16(codes, scales, bits, out_features, input.shape[-1])


_B16_SCHEMA = "(Tensor input, Tensor codes, Tensor scales, float bits, int out_features) -> Tensor"


@torch.library.custom_op("paretoq::linear_b16", mutates_args=(), schema=_B16_SCHEMA)
def linear_b16(input: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: float,
               out_features: int) -> torch.Tensor:
    return run_linear(input, *_unblocked(input, codes, scales, bits, out_features), bits, False)


@torch.library.custom_op("paretoq::linear_8da_b16", mutates_args=(), schema=_B16_SCHEMA)
def linear_8da_b16(input: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: float,
                   out_features: int) -> torch.Tensor:
    return run_linear(input, *_unblocked(input, codes, scales, bits, out_features), bits, True)


def _fake_b16(input, codes, scales, bits, out_features):
    _unblocked(input, codes, scales, bits, out_features)  # checks the shapes
    return input.new_empty((*input.shape[:-1], out_features))


for _op in (linear_b16, linear_8da_b16):
    _op.register_fake(_fake_b16)
