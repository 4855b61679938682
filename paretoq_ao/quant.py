"""ParetoQ quantization functions: levels, differentiable fake quantization, scale initialisation.

Scales ("alpha", the learnable clip value) have shape ``[out, 1]`` (one per output row) or
``[out, in // group_size]`` (one per group of ``group_size`` consecutive input columns).
"""

from __future__ import annotations

from typing import Optional

import torch

from .formats import SCALE_EPS, BitFormat, get_format

__all__ = ["fake_quantize", "init_scale", "quantize_codes", "dequantize_codes", "search_scale"]


def _check_weight_and_scale(weight: torch.Tensor, scale: torch.Tensor, what: str = "weight"):
    if weight.dim() != 2:
        raise ValueError(f"{what} must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out, inp = weight.shape
    if scale.dim() != 2 or scale.shape[0] != out or scale.shape[1] < 1 or inp % scale.shape[1]:
        raise ValueError(
            f"scale must have shape [out, 1] or [out, in // group_size] for a {what} of shape "
            f"{tuple(weight.shape)}, got {tuple(scale.shape)}"
        )


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[out, in] -> [out, groups, in // groups] (a view)."""
    return t.reshape(t.shape[0], groups, t.shape[1] // groups)


def _levels(ratio: torch.Tensor, fmt: BitFormat, w: torch.Tensor) -> torch.Tensor:
    """Normalised quantization level q of each element of ``w`` (ratio = w / alpha)."""
    if fmt.kind == "binary":
        # sign(W) (not of the ratio, which can underflow to -0.0), with sign(0) := +1 so that
        # every level fits in one bit.
        return torch.where(w < 0, -1.0, 1.0).to(ratio.dtype)
    if fmt.kind == "seq":
        clipped = torch.clamp(ratio, fmt.clip_lo, fmt.clip_hi)
        return (torch.round(clipped * fmt.seq_levels - fmt.seq_shift) + fmt.seq_shift) / fmt.seq_levels
    return torch.round(ratio).clamp(fmt.clip_lo, fmt.clip_hi)


def _scale_grad_per_element(ratio: torch.Tensor, level: torch.Tensor, fmt: BitFormat):
    """d(level * alpha)/d(alpha) per element, as the reference's LSQ-style estimator."""
    if fmt.kind == "binary":
        return level
    below = ratio < fmt.clip_lo
    above = ratio > fmt.clip_hi
    inside = level - ratio
    return torch.where(below, fmt.grad_lo, torch.where(above, fmt.grad_hi, inside)).to(ratio.dtype)


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, scale, bits):
        fmt = get_format(bits)
        groups = scale.shape[1]
        alpha = scale.clamp_min(SCALE_EPS).unsqueeze(-1)  # [out, groups, 1]
        w = _grouped(weight, groups)
        out = (_levels(w / alpha, fmt, w) * alpha).reshape(weight.shape)
        ctx.save_for_backward(weight, scale)
        ctx.bits = bits
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        fmt = get_format(ctx.bits)
        groups = scale.shape[1]
        alpha = scale.clamp_min(SCALE_EPS).unsqueeze(-1)
        w = _grouped(weight, groups)
        ratio = w / alpha
        g = _grouped(grad_out, groups)
        grad_weight = grad_scale = None
        if ctx.needs_input_grad[0]:
            inside = (ratio >= fmt.clip_lo) & (ratio <= fmt.clip_hi)
            grad_weight = (g * inside.to(g.dtype)).reshape(weight.shape)
        if ctx.needs_input_grad[1]:
            # Gradient scale of LSQ: 1 / sqrt(numel of the whole weight * Qp), also with groups.
            gscale = 1.0 / (weight.numel() * fmt.grad_qp) ** 0.5
            per_elem = _scale_grad_per_element(ratio, _levels(ratio, fmt, w), fmt)
            grad_scale = (per_elem * g * gscale).sum(dim=-1)
        return grad_weight, grad_scale, None


def fake_quantize(weight: torch.Tensor, scale: torch.Tensor, bits) -> torch.Tensor:
    """Quantize-dequantize ``weight`` [out, in] with ParetoQ's function for ``bits``.

    Differentiable: the weight gets the masked straight-through gradient (zero where
    ``W / alpha`` lies outside the clipping range) and ``scale`` the LSQ-style gradient with the
    reference's gradient scale. Computation happens in the weight's dtype.

    Deliberate differences from the reference (documented in the README): ``sign(0)`` is +1 at
    1 bit (the reference returns 0, a level one bit cannot store), and the scale may be per group.
    """
    fmt = get_format(bits)
    _check_weight_and_scale(weight, scale)
    return _FakeQuantize.apply(weight, scale, fmt.bits)


def init_scale(weight: torch.Tensor, bits, group_size: Optional[int] = None) -> torch.Tensor:
    """The paper's initial alpha per row ([out, 1]) or per group ([out, in // group_size]).

    1 bit: mean |W|; 1.58 and 2 bits: max |W|; 3 and 4 bits: max |W| / (2^(b-1) - 1).
    """
    fmt = get_format(bits)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    groups = _num_groups(weight.shape[1], group_size, f"weight of shape {tuple(weight.shape)}")
    w = _grouped(weight.detach(), groups).abs()
    stat = w.mean(dim=-1) if fmt.init == "mean" else w.amax(dim=-1)
    return (stat / fmt.init_div).to(weight.dtype)


def check_group_size(group_size: Optional[int]) -> None:
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0
    ):
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")


def _num_groups(in_features: int, group_size: Optional[int], where: str) -> int:
    check_group_size(group_size)
    if group_size is None:
        return 1
    if in_features % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features} of the {where}"
        )
    return in_features // group_size


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, bits) -> torch.Tensor:
    """Integer codes (uint8, [out, in]) of ``weight`` under ``scale``; see formats.py."""
    fmt = get_format(bits)
    _check_weight_and_scale(weight, scale)
    groups = scale.shape[1]
    alpha = scale.detach().clamp_min(SCALE_EPS).unsqueeze(-1)
    w = _grouped(weight.detach(), groups)
    level = _levels(w / alpha, fmt, w)
    codes = torch.round(level.float() / fmt.step + fmt.zero)
    return codes.reshape(weight.shape).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, bits, dtype=None) -> torch.Tensor:
    """Inverse of ``quantize_codes``: (code - zero) * step * alpha, in ``dtype`` (default scale's)."""
    fmt = get_format(bits)
    _check_weight_and_scale(codes, scale, "codes tensor")
    dtype = dtype or scale.dtype
    groups = scale.shape[1]
    alpha = scale.clamp_min(SCALE_EPS).to(dtype).unsqueeze(-1)
    level = (codes.to(dtype) - fmt.zero) * fmt.step
    return (_grouped(level, groups) * alpha).reshape(codes.shape)


# Candidate multipliers of the initial scale tried by ``search_scale`` (1.0 included, so the
# search never ends worse than the initialisation).
_SEARCH_GRID = torch.linspace(0.1, 1.5, 57)


def search_scale(weight: torch.Tensor, bits, group_size: Optional[int] = None) -> torch.Tensor:
    """Per row/group alpha minimising the squared weight error, searched on a grid around init."""
    fmt = get_format(bits)
    base = init_scale(weight, fmt, group_size).float()
    w = _grouped(weight.detach().float(), base.shape[1])
    w64 = w.double()
    best_err = torch.full_like(base, float("inf"), dtype=torch.float64)
    best = base.clone()
    for m in _SEARCH_GRID.tolist():
        # candidates are rounded to the weight's dtype first: the error is that of the stored scale
        cand = (base * m).to(weight.dtype).float()
        alpha = cand.clamp_min(SCALE_EPS).unsqueeze(-1)
        err = ((_levels(w / alpha, fmt, w) * alpha).double() - w64).square().sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, cand, best)
    return best.to(weight.dtype)
