"""PyTorch reference of the kernels' int8-activation mode (same arithmetic as csrc/kernels.cpp)."""

from __future__ import annotations

import torch

from paretoq_ao.formats import get_format
from paretoq_ao.packing import unpack_codes


def reference_linear_int8(input: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits) -> torch.Tensor:
    """Per-token int8 activations (d = absmax/127, q = round(x/d)), integer dots per group, then
    ``d * step * sum_g max(s_g, 1e-5) * (dot_g - zero * sum_g q)`` (float64 here)."""
    fmt = get_format(bits)
    k = input.shape[-1]
    x = input.reshape(-1, k).float()
    d = x.abs().amax(dim=1, keepdim=True) / 127.0
    q = torch.where(d > 0, torch.round(x / torch.where(d > 0, d, torch.ones_like(d))), torch.zeros_like(x))
    q = q.clamp(-127, 127).double()
    codes = unpack_codes(packed, k, bits).double()
    g = scale.shape[1]
    gs = k // g
    dots = torch.einsum("mgk,ngk->mng", q.view(-1, g, gs), codes.view(-1, g, gs))
    qsum = q.view(-1, g, gs).sum(-1)  # [M, G]
    s = scale.float().clamp_min(1e-5).double()
    out = ((dots - fmt.zero * qsum[:, None, :]) * s[None]).sum(-1) * fmt.step * d.double()
    return out.to(input.dtype).reshape(*input.shape[:-1], packed.shape[0])
