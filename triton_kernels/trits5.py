"""Triton kernel for ternary weights in the trits5 layout (``paretoq_ao/packing.py``: 5 trits per
byte, 4-byte words of 20 codes, code ``20w + nb*i + j`` = trit ``i`` of byte ``4w + j``).

One kernel serves every M: a program owns a ``[BLOCK_M, BLOCK_N]`` output tile and walks K in
tiles of ``BLOCK_K`` columns. For each column it computes the byte and the trit that hold it
(``w = k // 20``, ``o = k % 20``, ``nb = min(4, row_bytes - 4w)``, byte ``4w + o % nb``, trit
``o // nb``), gathers the bytes (each byte is loaded by the 5 columns it holds; the repeats hit the
L1 cache), and decodes without a table or a division: ``s = (byte * 3**trit) & 255``,
``t = (3 s) >> 8``. The integer level ``2 t - 2`` (exact in every dtype) is fed to ``tl.dot``;
per-row scales are applied in fp32 in the epilogue (``step / 2 * max(scale, 1e-5)``), group scales
per element before the dot (the weight then rounded to the activation dtype, as the reference
does). Accumulation is fp32. ``tl.dot`` needs tiles >= 16, so M = 1 runs a 16-row tile with the
rows past M masked.

This kernel is not autotuned: ``config_for`` picks a tile from M. It has not been timed on a GPU
(none was available when it was written); the rowbits kernels of linear.py remain the tuned ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paretoq_ao.formats import SCALE_EPS, get_format

__all__ = ["trits5_linear", "config_for", "TRITS5_CONFIGS"]


@triton.jit
def _trits5_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr,
    M, N, K, row_bytes,
    stride_xm, stride_om, stride_wn, stride_sn, stride_sg,
    HALF_STEP: tl.constexpr, PER_ROW: tl.constexpr, GROUP_SIZE: tl.constexpr, SCALE_EPS_: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        col = k0 + tl.arange(0, BLOCK_K)
        k_mask = col < K
        word = col // 20
        off = col - 20 * word
        left = row_bytes - 4 * word
        nb = tl.where(left < 4, left, 4)
        nb = tl.where(nb > 0, nb, 1)  # columns past K (masked) must not divide by zero
        byte = 4 * word + off % nb
        trit = off // nb
        pw = tl.where(trit == 0, 1, tl.where(trit == 1, 3, tl.where(trit == 2, 9, tl.where(trit == 3, 27, 81))))
        wm = n_mask[:, None] & k_mask[None, :]
        b = tl.load(w_ptr + rn[:, None] * stride_wn + byte[None, :], mask=wm, other=0).to(tl.int32)
        s = (b * pw[None, :]) & 255
        level = 2 * ((s * 3) >> 8) - 2  # 2 * (code - zero), zero = 1
        xv = tl.load(x_ptr + rm[:, None] * stride_xm + col[None, :], mask=m_mask[:, None] & k_mask[None, :],
                     other=0.0)
        if PER_ROW:
            wv = level.to(xv.dtype)
        else:
            sc = tl.load(s_ptr + rn[:, None] * stride_sn + (col // GROUP_SIZE)[None, :] * stride_sg, mask=wm,
                         other=1.0).to(tl.float32)
            sc = tl.where(sc < SCALE_EPS_, SCALE_EPS_, sc)
            wv = (level.to(tl.float32) * (sc * HALF_STEP)).to(xv.dtype)
        acc += tl.dot(xv, tl.trans(wv), input_precision=DOT_PRECISION)
    if PER_ROW:
        sr = tl.load(s_ptr + rn * stride_sn, mask=n_mask, other=1.0).to(tl.float32)
        sr = tl.where(sr < SCALE_EPS_, SCALE_EPS_, sr)
        acc = acc * (sr * HALF_STEP)[None, :]
    om = m_mask[:, None] & n_mask[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=om)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) by M: decode (M <= 16) and prefill tiles.
TRITS5_CONFIGS = {"small": (16, 64, 64, 4), "large": (64, 64, 64, 4)}


def config_for(M: int):
    return TRITS5_CONFIGS["small" if M <= 16 else "large"]


def _dot_precision(x_dtype):
    if x_dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def trits5_linear(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits, out_dtype) -> torch.Tensor:
    """``x2 [M, K] @ dequantize(packed, scale).T`` for a trits5 weight (arguments validated by the
    caller, ``linear.triton_linear``); returns ``[M, N]`` in ``out_dtype``."""
    fmt = get_format(bits)
    M, K = x2.shape
    N = packed.shape[0]
    bm, bn, bk, warps = config_for(M)
    out = torch.empty((M, N), dtype=out_dtype, device=x2.device)
    per_row = scale.shape[1] == 1
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _trits5_kernel[grid](
        x2, packed, scale, out,
        M, N, K, packed.shape[1],
        x2.stride(0), out.stride(0), packed.stride(0), scale.stride(0), scale.stride(1),
        HALF_STEP=float(fmt.step / 2), PER_ROW=per_row, GROUP_SIZE=1 if per_row else K // scale.shape[1],
        SCALE_EPS_=SCALE_EPS, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PRECISION=_dot_precision(x2.dtype),
        num_warps=warps,
    )
    return out
