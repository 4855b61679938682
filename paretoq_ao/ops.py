"""The ``paretoq::linear`` operator: every packed linear layer runs through this one op.

``paretoq::linear(Tensor input, Tensor packed, Tensor scale, float bits) -> Tensor``

* ``input``  [..., K] floating activations;
* ``packed`` uint8 [N, ceil(K * code_bits / 8)] in the layout of packing.py;
* ``scale``  [N, G] with G dividing K (G = 1: per row; else groups of K / G columns);
* ``bits``   1, 1.58, 2, 3 or 4;
* returns ``input @ dequantize(packed, scale).T`` of shape [..., N] in the input's dtype.

K is taken from ``input``: the op rejects a K whose packed row length differs, but cannot tell
K values that round up to the same number of bytes apart (e.g. K = 5..8 at 1 bit). The packed
weight subclass, which knows its K, checks it before calling the op.

Implementations, chosen per call:

* CUDA tensors (and CPU tensors while ``TRITON_INTERPRET=1``, which runs the same kernels in
  Triton's interpreter): the fused kernels of ``paretoq_ao.triton_kernels``, loaded on first use;
  inputs they do not support (e.g. fp64) fall back to the reference;
* otherwise the plain PyTorch reference: unpack, dequantize in the scale's dtype, cast to the
  input dtype, matmul.

``torch.compile`` and ``torch.export`` see the single op (its fake implementation gives shapes);
the ExecuTorch kernel library implements the same schema.
"""

from __future__ import annotations

import importlib
import os

import torch
import torch.nn.functional as F

from .formats import get_format
from .packing import packed_row_bytes, unpack_codes
from .quant import dequantize_codes

__all__ = ["linear", "check_linear_args", "reference_linear"]


def check_linear_args(input: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits):
    """Validate the op's arguments; errors name the shapes and dtypes involved."""
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
    if packed.shape[1] != packed_row_bytes(k, fmt.code_bits):
        raise ValueError(
            f"paretoq::linear: input has K={k} features but the packed {fmt} weight of shape "
            f"{tuple(packed.shape)} holds {packed.shape[1]} bytes per row "
            f"(K={k} needs {packed_row_bytes(k, fmt.code_bits)})"
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


_TRITON = None


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton for its CPU interpreter (the values Triton reads
    as true: 1, true, yes, on)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def _triton_backend(input: torch.Tensor):
    """The Triton kernels module when this call should use it, else None."""
    global _TRITON
    if not (input.is_cuda or triton_interpreting()):
        return None
    if _TRITON is None:
        _TRITON = importlib.import_module("paretoq_ao.triton_kernels")
    return _TRITON


@torch.library.custom_op("paretoq::linear", mutates_args=())
def linear(input: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits: float) -> torch.Tensor:
    check_linear_args(input, packed, scale, bits)
    triton = _triton_backend(input)
    if triton is not None and triton.supports(input, packed, scale, bits):
        return triton.triton_linear(input, packed, scale, bits)
    return reference_linear(input, packed, scale, bits)


@linear.register_fake
def _(input, packed, scale, bits):
    check_linear_args(input, packed, scale, bits)
    return input.new_empty((*input.shape[:-1], packed.shape[0]))



def _setup_context(ctx, inputs, output):
    x, packed, scale, bits = inputs
    ctx.save_for_backward(packed, scale)
    ctx.bits = bits
    ctx.in_features = x.shape[-1]


def _backward(ctx, grad):
    # Gradient for the activations only (packed weights are frozen): grad @ dequantize(W).
    packed, scale = ctx.saved_tensors
    codes = unpack_codes(packed, ctx.in_features, ctx.bits)
    weight = dequantize_codes(codes, scale, ctx.bits).to(grad.dtype)
    return grad @ weight, None, None, None


linear.register_autograd(_backward, setup_context=_setup_context)
