"""The packed weight layout (the one definition every backend reads).

Layout ``paretoq-rowbits-v1``
-----------------------------
A weight of shape [N, K] (out_features, in_features) with ``b``-bit codes (``code_bits`` of its
format, see formats.py) is stored as a ``uint8`` tensor of shape ``[N, ceil(K * b / 8)]``:

* each row is an independent little-endian bit stream: code ``k`` of row ``n`` occupies bits
  ``b*k .. b*k + b - 1`` of that row, where bit ``j`` of the stream is bit ``j % 8`` of byte
  ``j // 8`` (least significant bit first);
* for b = 1, 2, 4 codes never straddle a byte (8, 4, 2 codes per byte; code ``k`` sits at bit
  ``b * (k % (8 // b))`` of byte ``k // (8 // b)``);
* for b = 3 every 8 codes fill exactly 3 bytes (24 bits, code ``i`` of the group at bits
  ``3i .. 3i+2`` of the little-endian 24-bit word); codes 2 and 5 of each group straddle bytes;
* the tail of a row (when ``K * b`` is not a multiple of 8) is zero bits.

Ternary (1.58) uses 2-bit codes {0, 1, 2}. Scales are stored separately, in the weight's dtype,
as [N, 1] (per row) or [N, K / group_size] (per group); the dequantized weight is
``(code - zero) * step * scale`` with ``zero`` / ``step`` from formats.py.
"""

from __future__ import annotations

import torch

from .formats import get_format

__all__ = ["LAYOUT", "pack_codes", "unpack_codes", "packed_row_bytes"]

LAYOUT = "paretoq-rowbits-v1"


def packed_row_bytes(in_features: int, code_bits: int) -> int:
    return (in_features * code_bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits) -> torch.Tensor:
    """Pack integer codes [N, K] (values < 2**code_bits) into the layout above."""
    fmt = get_format(bits)
    b = fmt.code_bits
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= fmt.n_codes:
            raise ValueError(
                f"codes of the {fmt} format must be in [0, {fmt.n_codes}) for {b}-bit storage "
                f"(< {1 << b}), got values in [{lo}, {hi}]"
            )
    k8 = (k + 7) // 8 * 8
    c = torch.zeros(n, k8, dtype=torch.int32, device=codes.device)
    c[:, :k] = codes.to(torch.int32)
    # Every 8 codes form one b-byte little-endian word.
    shifts = torch.arange(8, dtype=torch.int32, device=codes.device) * b
    words = (c.view(n, k8 // 8, 8) << shifts).sum(dim=-1, dtype=torch.int64)
    byte_shifts = torch.arange(b, dtype=torch.int64, device=codes.device) * 8
    out = ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(n, k8 // 8 * b)
    return out[:, : packed_row_bytes(k, b)].contiguous()


def unpack_codes(packed: torch.Tensor, in_features: int, bits) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 [N, ceil(K*b/8)] -> uint8 codes [N, K]."""
    b = get_format(bits).code_bits
    n, row = packed.shape
    if row != packed_row_bytes(in_features, b):
        raise ValueError(
            f"packed rows hold {row} bytes but in_features={in_features} at {b} bits needs "
            f"{packed_row_bytes(in_features, b)}"
        )
    k8 = (in_features + 7) // 8 * 8
    full = torch.zeros(n, k8 // 8 * b, dtype=torch.int64, device=packed.device)
    full[:, :row] = packed.to(torch.int64)
    byte_shifts = torch.arange(b, dtype=torch.int64, device=packed.device) * 8
    words = (full.view(n, k8 // 8, b) << byte_shifts).sum(dim=-1)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * b
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << b) - 1)
    return codes.reshape(n, k8)[:, :in_features].to(torch.uint8)
