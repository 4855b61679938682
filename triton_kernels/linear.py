"""Fused Triton kernels for ``paretoq::linear``: ``x [..., K] @ dequantize(packed, scale).T``.

Packed layout read
------------------
The kernels read the canonical layout ``paretoq-rowbits-v1`` of ``paretoq_ao/packing.py``
directly, with no repacking: ``packed`` is uint8 ``[N, ceil(K * b / 8)]`` (``b`` = ``code_bits``
of the format: 1, 2, 2, 3, 4 for bits 1, 1.58, 2, 3, 4), each row an independent little-endian bit
stream in which code ``k`` occupies bits ``b*k .. b*k + b - 1`` (bit ``j`` = bit ``j % 8`` of byte
``j // 8``), the row tail zero bits. Bytes inside a row must be contiguous
(``packed.stride(1) == 1``, else ValueError); rows may have any stride (``packed.stride(0)`` is
passed to the kernel), so a row-slice of a larger buffer works.

How a K tile is decoded (``_load_unit_codes``): a *unit* is the smallest run of whole bytes that
holds whole codes -- one byte of ``P = 8 / b`` codes for b = 1, 2, 4, three bytes (one 24-bit
little-endian word) of ``P = 8`` codes for b = 3 (codes 2 and 5 of each unit straddle bytes; the
word makes that invisible). A tile of ``BLOCK_K`` columns starting at a multiple of ``BLOCK_K`` is
``BLOCK_K / P`` whole units, so

    word[n, u] = bytes of unit u (1 byte, or b0 | b1 << 8 | b2 << 16 for 3-bit)
    code[n, u, p] = (word[n, u] >> (b * p)) & (2**b - 1)      -> column k0 + u * P + p

Every packed byte is loaded exactly once (for b = 1, 2, 4 as contiguous, vectorised loads --
``tl.multiple_of`` hints make e.g. 16-byte loads; for b = 3 as three byte planes), the codes are
unpacked with shifts in registers. The GEMV keeps the ``[BLOCK_N, units, P]`` shape all the way
(activations are loaded in the same ``[units, P]`` shape), the tl.dot kernel reshapes the codes to
``[BLOCK_N, BLOCK_K]`` (order preserved). Bytes past the row end are masked (``other=0``); codes
past K are multiplied by activations masked to 0.

Dequantization in registers
---------------------------
``value = (code - zero) * step * max(scale, 1e-5)`` (quant.dequantize_codes). The kernels form the
*integer* level ``2*code - 2*zero`` (``2*zero`` is an integer for every format: 1, 2, 3, 8, 16),
which is exact in fp16/bf16/fp32, feed it to the dot product, and apply ``step / 2`` and the scale
in fp32:

* per-row scales (``scale [N, 1]``): once per output in the epilogue;
* group scales (``scale [N, G]``, groups of ``K // G`` columns) when the K tile lies inside one
  group (``group_size % BLOCK_K == 0``): one scale per row per K tile, applied to the tile's fp32
  partial sum;
* otherwise (groups narrower than / not aligned with the tile): the scale is gathered per element
  and multiplied into the weight tile before the dot (the weight is then rounded to the activation
  dtype, as the reference does).

Accumulation is fp32; the result is cast once to the output dtype. fp32 activations use IEEE fp32
dot products unless ``torch.get_float32_matmul_precision()`` allows TF32 (as torch.matmul does).
Numerics therefore differ from ``reference_linear`` (which rounds the dequantized weight to the
scale's and then the activation's dtype) only by rounding.

Kernels and paths
-----------------
* ``_gemv_kernel`` (M == 1, also a candidate for M <= 4): no tensor cores; a program owns
  ``BLOCK_N`` rows and a slice of K, keeps a ``[BLOCK_N, BLOCK_K]``-element fp32 accumulator and
  reduces once at the end. Split-K: grid ``(cdiv(N, BLOCK_N), SPLIT_K, M)``; with ``SPLIT_K > 1`` every
  program adds its partial sums to a zero-initialised fp32 buffer with relaxed ``atomic_add`` and
  the buffer is cast to the output dtype afterwards (no cast when the output is fp32). With
  ``SPLIT_K == 1`` results are stored directly in the output dtype (no buffer, no extra kernels).
* ``_gemv_words_kernel`` ("gemvw"; 1/2/4-bit codes -- 1.58 included -- on rows of whole 4-byte
  words): the GEMV the tuner prefers where it applies; see "The word GEMV" below. Same grid and
  split-K scheme as ``_gemv_kernel``.
* ``_gemm_kernel`` (2 <= M): ``tl.dot`` tiles (all block sizes >= 16), grouped (``GROUP_M``)
  program order for L2 reuse, optional split-K with the same fp32 atomic scheme (small M, where the
  op is memory bound and N tiles alone do not fill the GPU). The small-M (2..64) and large-M paths
  use this kernel with different config sets.

The word GEMV
-------------
``_gemv_kernel`` keeps the ``[BLOCK_N, units, P]`` shape, and Triton moves the loaded bytes into
that layout through shared memory: the sm_90 code of a 2-bit tile has two barriers and a
shared-memory round trip per K tile and about 7 instructions per weight code, several times what a
memory-bound GEMV can afford (an H100 streams 2-bit codes faster than it can issue 4
instructions for each). ``_gemv_words_kernel`` reads the same bytes as int32 words
(``words_view``: rows of whole, 4-byte-aligned words; no repacking -- word ``j`` is bytes
``4j .. 4j+3``, little-endian, so code ``k`` of the word sits at bits ``b*k .. b*k+b-1``) and never
changes layout inside the K loop:

* the tile is ``[BLOCK_N, WORDS]`` words (``WORDS = BLOCK_K / (32 / b)``), one accumulator of
  the same shape; a thread owns several rows and several whole words (16-byte loads);
* code ``p`` of every word is taken with one AND of a constant mask, no shift: ``lo = word << 1``
  holds codes ``p < 16/b`` and ``hi = (word >> 15) & 0x1FFFE`` the others, each at bits
  ``b*(p mod 16/b) + 1 ..``; OR-ing the exponent of 2**23 makes the float ``2**23 + 2c * 2**e``
  (``e = b*(p mod 16/b)``), exact because the value fits the 23-bit mantissa; one subtraction
  leaves ``2c * 2**e`` (one LOP3 + one FADD, no integer-to-float conversion);
* the activations of code ``p`` (one per word: ``x[w * 32/b + p]``) are loaded once per thread
  and multiplied by ``2**-e / 2``, exact, then shared by the thread's rows, so the multiply-add
  gives ``c * x``; the zero point comes out of the sum: ``sum((c - z) x) = sum(c x) - z sum(x)``
  with ``sum(x)`` accumulated per word from the same loads;
* per-row scales are applied in the epilogue; group scales (groups holding whole K tiles) once
  per tile and row to the tile's partial sums (``(part - z * xsum) * s``).

That is 3 instructions per code (LOP3, FADD, FFMA) plus the loads, shifts and address arithmetic
shared by a thread's rows and words: 3.75 per code for the 128 x 256 tile on sm_90, no shared
memory or barrier in the loop (``benchmarks/kernel_sass.py`` prints these counts for any config).
3-bit codes straddle words and stay on ``_gemv_kernel``, as do rows that are not whole words
(e.g. 2-bit with K not a multiple of 16), narrow groups, and row slices at odd offsets. Whether the
word GEMV wins is still decided per shape by the autotuner on the GPU; both kinds are candidates.

Configs are chosen by the autotuner of ``tuning.py`` (keyed on path, M bucket, N, K, format,
groups, dtypes); under ``TRITON_INTERPRET=1`` one fixed config per path is used.

Input handling
--------------
``x`` may have any leading shape; it is viewed as ``[M, K]``. If its last dimension is not
unit-stride it is copied once with ``.contiguous()`` (documented behaviour, not an error); any row
stride is otherwise supported without a copy. Unsupported inputs raise before launching (see
``_validate``). Atomic split-K makes the low bits of fp32 sums depend on the order of the adds; when
``torch.are_deterministic_algorithms_enabled()`` the tuner only uses split-free configs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from paretoq_ao.formats import SCALE_EPS, get_format
from paretoq_ao.ops import check_linear_args

__all__ = ["triton_linear", "supports", "KernelConfig", "interpreting", "SUPPORTED_DTYPES", "LAYOUT_READ"]

LAYOUT_READ = "paretoq-rowbits-v1"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The largest M served by the GEMV kernels (they use grid axis 2 for M, one program per row).
GEMV_MAX_M = 8
KERNEL_KINDS = ("gemv", "gemvw", "gemm", "gemmw")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


# The kernels use only builtins of triton.language plus the jit helpers below, not the jit-defined
# standard-library functions (tl.zeros, tl.sum, tl.cdiv): those are created when triton.language is
# first imported, and if that happened before TRITON_INTERPRET=1 was set (e.g. by another module of
# a test session) the interpreter cannot call them.


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _load_unit_codes(w_rows, k0, n_mask, row_bytes, CODE_BITS: tl.constexpr,
                     UNITS: tl.constexpr, PER_UNIT: tl.constexpr):
    """Codes (int32) ``[BLOCK_N, UNITS, PER_UNIT]`` of columns ``k0 + u * PER_UNIT + p``.

    A *unit* is the smallest run of whole bytes holding whole codes: one byte of 8 / 4 / 2 codes
    for b = 1 / 2 / 4, three bytes (a 24-bit little-endian word) of 8 codes for b = 3. Every byte
    of the tile is loaded once (contiguous for b = 1, 2, 4; three byte planes for b = 3); codes are
    unpacked in registers by shifting the unit word. ``k0`` must be a multiple of 8.
    Bytes past the end of the row load as 0.
    """
    offs_u = tl.arange(0, UNITS)
    unit0 = tl.multiple_of(k0 // PER_UNIT, UNITS)  # k0 is a multiple of BLOCK_K
    if CODE_BITS == 3:
        byte = (unit0 + offs_u) * 3
    else:
        byte = unit0 + offs_u
    m = n_mask[:, None] & (byte < row_bytes)[None, :]
    word = tl.load(w_rows + byte[None, :], mask=m, other=0).to(tl.int32)
    if CODE_BITS == 3:
        m1 = n_mask[:, None] & ((byte + 1) < row_bytes)[None, :]
        m2 = n_mask[:, None] & ((byte + 2) < row_bytes)[None, :]
        b1 = tl.load(w_rows + (byte + 1)[None, :], mask=m1, other=0).to(tl.int32)
        b2 = tl.load(w_rows + (byte + 2)[None, :], mask=m2, other=0).to(tl.int32)
        word = word | (b1 << 8) | (b2 << 16)
    shifts = tl.arange(0, PER_UNIT) * CODE_BITS
    return (word[:, :, None] >> shifts[None, None, :]) & ((1 << CODE_BITS) - 1)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr,
    N, K, row_bytes, k_per_split,
    stride_xm, stride_om, stride_wn, stride_sn, stride_sg,
    CODE_BITS: tl.constexpr, PER_UNIT: tl.constexpr, TWO_ZERO: tl.constexpr,
    HALF_STEP: tl.constexpr, SCALE_MODE: tl.constexpr, GROUP_SIZE: tl.constexpr,
    SCALE_EPS_: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
):
    UNITS: tl.constexpr = BLOCK_K // PER_UNIT
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    w_rows = w_ptr + offs_n64[:, None] * stride_wn
    s_rows = s_ptr + offs_n64 * stride_sn
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    # column of element [u, p] of a tile, relative to the tile start
    offs_up = tl.arange(0, UNITS)[:, None] * PER_UNIT + tl.arange(0, PER_UNIT)[None, :]

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # The accumulator keeps the tile shape; it is reduced once after the loop.
    acc = tl.full([BLOCK_N, UNITS, PER_UNIT], 0.0, tl.float32)
    for k_it in range(k_start, k_end, BLOCK_K):
        k0 = tl.multiple_of(k_it, BLOCK_K)  # tiles start on multiples of BLOCK_K
        codes = _load_unit_codes(w_rows, k0, n_mask, row_bytes, CODE_BITS, UNITS, PER_UNIT)
        lvl = codes.to(tl.float32) * 2.0 - TWO_ZERO
        offs_k = k0 + offs_up
        k_mask = offs_k < K  # K tiles never cross a split boundary
        xv = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :, :]
        if SCALE_MODE == 1:
            s = tl.load(s_rows + (k0 // GROUP_SIZE) * stride_sg, mask=n_mask, other=1.0)
            s = tl.maximum(s.to(tl.float32), SCALE_EPS_)
            acc += lvl * (xv * s[:, None, None])
        elif SCALE_MODE == 2:
            s_ptrs = s_rows[:, None, None] + ((offs_k // GROUP_SIZE) * stride_sg)[None, :, :]
            s = tl.load(s_ptrs, mask=n_mask[:, None, None] & k_mask[None, :, :], other=1.0)
            acc += lvl * tl.maximum(s.to(tl.float32), SCALE_EPS_) * xv
        else:
            acc += lvl * xv
    res = tl.reduce(tl.reduce(acc, 2, _add), 1, _add)
    if SCALE_MODE == 0:
        s = tl.load(s_rows, mask=n_mask, other=1.0)
        res = res * tl.maximum(s.to(tl.float32), SCALE_EPS_)
    res = res * HALF_STEP

    out_ptrs = out_ptr + pid_m.to(tl.int64) * stride_om + offs_n
    if ATOMIC:
        tl.atomic_add(out_ptrs, res, mask=n_mask, sem="relaxed")
    else:
        tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _word_tile(acc, lo, hi, x_ptrs, k0, K, magic, offs_w, CODE_BITS: tl.constexpr,
               EVEN_K: tl.constexpr):
    """``acc + sum_p c_p * x_p`` over the 32 / b codes of every word of a K tile, and the sum of
    the tile's activations per word (see "The word GEMV" above for the decode)."""
    WC: tl.constexpr = 32 // CODE_BITS
    HC: tl.constexpr = WC // 2
    MASK: tl.constexpr = (1 << CODE_BITS) - 1
    xw = offs_w.to(tl.float32) * 0.0  # [WORDS] zeros (tl.zeros_like is not a builtin)
    for p in tl.static_range(WC):
        if EVEN_K:
            xv = tl.load(x_ptrs + (k0 + p)).to(tl.float32)
        else:
            xv = tl.load(x_ptrs + (k0 + p), mask=(offs_w * WC + (k0 + p)) < K,
                         other=0.0).to(tl.float32)
        xw += xv
        if p < HC:
            src = lo
        else:
            src = hi
        # (2 * code) * 2**(b * (p % HC)) exactly, as float: 2**23 + v with v's bits in the mantissa
        f = ((src & (MASK << (CODE_BITS * (p % HC) + 1))) | magic).to(tl.float32, bitcast=True)
        f = f - 8388608.0
        acc += f * (xv * (0.5 / (1 << (CODE_BITS * (p % HC)))))[None, :]
    return acc, xw


@triton.jit
def _gemv_words_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr,
    N, K, row_words, k_per_split,
    stride_xm, stride_om, stride_wn, stride_sn, stride_sg, zero_i,
    CODE_BITS: tl.constexpr, TWO_ZERO: tl.constexpr,
    HALF_STEP: tl.constexpr, SCALE_MODE: tl.constexpr, GROUP_SIZE: tl.constexpr,
    SCALE_EPS_: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """GEMV over the packed rows read as int32 words (b = 1, 2, 4; see "The word GEMV" above)."""
    WC: tl.constexpr = 32 // CODE_BITS  # codes per word
    WORDS: tl.constexpr = BLOCK_K // WC
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    offs_w = tl.arange(0, WORDS)
    w_ptrs = w_ptr + offs_n64[:, None] * stride_wn + offs_w[None, :]
    s_rows = s_ptr + offs_n64 * stride_sn
    x_ptrs = x_ptr + pid_m.to(tl.int64) * stride_xm + offs_w * WC  # column of code 0 of each word
    # A runtime 0 keeps the exponent pattern in a register, so that each code's mask is the
    # immediate operand of one LOP3 ((word & mask) | magic).
    magic = 0x4B000000 | zero_i

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.full([BLOCK_N, WORDS], 0.0, tl.float32)
    xsum = tl.full([WORDS], 0.0, tl.float32)
    for k_it in range(k_start, k_end, BLOCK_K):
        k0 = tl.multiple_of(k_it, BLOCK_K)  # tiles start on multiples of BLOCK_K
        w0 = k0 // WC
        if EVEN_K:
            word = tl.load(w_ptrs + w0, mask=n_mask[:, None], other=0)
        else:
            w_mask = n_mask[:, None] & ((w0 + offs_w) < row_words)[None, :]
            word = tl.load(w_ptrs + w0, mask=w_mask, other=0)
        lo = word << 1  # code p < HC at bits b*p+1 ..
        hi = (word >> 15) & 0x1FFFE  # code HC + p at the same bits
        if SCALE_MODE == 1:  # the tile lies inside one group: one scale per row
            part, xw = _word_tile(tl.full([BLOCK_N, WORDS], 0.0, tl.float32), lo, hi, x_ptrs, k0, K, magic, offs_w,
                                  CODE_BITS, EVEN_K)
            s = tl.load(s_rows + (k0 // GROUP_SIZE) * stride_sg, mask=n_mask, other=1.0)
            s = tl.maximum(s.to(tl.float32), SCALE_EPS_)
            acc += (part - (TWO_ZERO * 0.5) * xw[None, :]) * s[:, None]
        else:  # per-row scale: accumulate in place, scale in the epilogue
            acc, xw = _word_tile(acc, lo, hi, x_ptrs, k0, K, magic, offs_w, CODE_BITS, EVEN_K)
            xsum += xw
    res = tl.reduce(acc, 1, _add)
    if SCALE_MODE == 0:
        res = res - (TWO_ZERO * 0.5) * tl.reduce(xsum, 0, _add)
        s = tl.load(s_rows, mask=n_mask, other=1.0)
        res = res * tl.maximum(s.to(tl.float32), SCALE_EPS_)
    res = res * (2.0 * HALF_STEP)

    out_ptrs = out_ptr + pid_m.to(tl.int64) * stride_om + offs_n
    if ATOMIC:
        tl.atomic_add(out_ptrs, res, mask=n_mask, sem="relaxed")
    else:
        tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=n_mask)


# Decode of a [BLOCK_N, BLOCK_K] tile from int32 words for the tl.dot kernel ("gemmw"). A word of
# WC = 32 / b codes is split into 16-bit halves (lo: codes 0 .. WC/2 - 1, hi: the rest, both at
# bits b * (p mod WC/2)); each code is isolated in place by one AND with a constant mask, made a
# float by OR-ing the exponent of 2**23 (2**23 + code * 2**S, exact) and turned into
# ``code - zero`` by one FMA (times 2**-S, minus 2**(23-S) + zero: exact). tl.join assembles the
# leaves in registers: the first join separates code p from p + WC/2 (lo / hi), each further one
# halves the distance, so that the joined dims flatten to p = 0 .. WC-1 in order. The halves are
# taken one bit up (S = b * (p mod WC/2) + 1), which keeps 2**(23-S) + zero exact in fp32.

@triton.jit
def _leaf(half, magic, S: tl.constexpr, CODE_BITS: tl.constexpr, ZERO: tl.constexpr):
    f = ((half & (((1 << CODE_BITS) - 1) << S)) | magic).to(tl.float32, bitcast=True)
    return f * (1.0 / (1 << S)) - ((8388608.0 / (1 << S)) + ZERO)


@triton.jit
def _join1(lo, hi, magic, S: tl.constexpr, B: tl.constexpr, ZERO: tl.constexpr):
    return tl.join(_leaf(lo, magic, S, B, ZERO), _leaf(hi, magic, S, B, ZERO))


@triton.jit
def _join2(lo, hi, magic, S: tl.constexpr, D: tl.constexpr, B: tl.constexpr, ZERO: tl.constexpr):
    return tl.join(_join1(lo, hi, magic, S, B, ZERO), _join1(lo, hi, magic, S + D, B, ZERO))


@triton.jit
def _join3(lo, hi, magic, S: tl.constexpr, D: tl.constexpr, B: tl.constexpr, ZERO: tl.constexpr):
    return tl.join(_join2(lo, hi, magic, S, 2 * D, B, ZERO),
                   _join2(lo, hi, magic, S + D, 2 * D, B, ZERO))


@triton.jit
def _join4(lo, hi, magic, S: tl.constexpr, D: tl.constexpr, B: tl.constexpr, ZERO: tl.constexpr):
    return tl.join(_join3(lo, hi, magic, S, 2 * D, B, ZERO),
                   _join3(lo, hi, magic, S + D, 2 * D, B, ZERO))


@triton.jit
def _join5(lo, hi, magic, S: tl.constexpr, D: tl.constexpr, B: tl.constexpr, ZERO: tl.constexpr):
    return tl.join(_join4(lo, hi, magic, S, 2 * D, B, ZERO),
                   _join4(lo, hi, magic, S + D, 2 * D, B, ZERO))


@triton.jit
def _word_levels(word, magic, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 CODE_BITS: tl.constexpr, ZERO: tl.constexpr):
    """fp32 ``code - zero`` ``[BLOCK_N, BLOCK_K]`` of int32 words ``[BLOCK_N, BLOCK_K * b / 32]``."""
    # One bit up (S >= 1): 2**(23 - S) + zero is then exact in fp32 for the half-integer zero
    # points (0.5 and 1.5 of the 1- and 2-bit grids).
    lo = word << 1
    hi = (word >> 15) & 0x1FFFE
    if CODE_BITS == 4:  # 8 codes a word: distances 4, 2, 1 codes = 16, 8, 4 bits
        t = _join3(lo, hi, magic, 1, 4, CODE_BITS, ZERO)
    elif CODE_BITS == 2:  # 16 codes: 8, 4, 2, 1 codes
        t = _join4(lo, hi, magic, 1, 2, CODE_BITS, ZERO)
    else:  # 32 codes: 16, 8, 4, 2, 1 codes
        t = _join5(lo, hi, magic, 1, 1, CODE_BITS, ZERO)
    return tl.reshape(t, [BLOCK_N, BLOCK_K])


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr,
    M, N, K, row_bytes, k_per_split,
    stride_xm, stride_om, stride_wn, stride_sn, stride_sg, zero_i,
    CODE_BITS: tl.constexpr, PER_UNIT: tl.constexpr, TWO_ZERO: tl.constexpr,
    HALF_STEP: tl.constexpr, SCALE_MODE: tl.constexpr, GROUP_SIZE: tl.constexpr,
    SCALE_EPS_: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, ATOMIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WORDS_IN: tl.constexpr,
):
    """tl.dot GEMM. WORDS_IN ("gemmw"): ``w_ptr`` is the rows as int32 words and ``row_bytes``
    counts words; the tile is decoded by ``_word_levels`` to ``code - zero``. Otherwise bytes,
    decoded by ``_load_unit_codes`` to ``2 * code - 2 * zero``."""
    UNITS: tl.constexpr = BLOCK_K // PER_UNIT
    WC: tl.constexpr = 32 // CODE_BITS
    magic = 0x4B000000 | zero_i  # a register: the masks of _leaf become LOP3 immediates
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    # Grouped ordering: GROUP_M row tiles share the weight tiles they read while in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n64[:, None] * stride_wn
    s_rows = s_ptr + offs_n64 * stride_sn
    dot_dtype = x_ptr.dtype.element_ty

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k_it in range(k_start, k_end, BLOCK_K):
        k0 = tl.multiple_of(k_it, BLOCK_K)  # tiles start on multiples of BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K  # K tiles never cross a split boundary
        a = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if WORDS_IN:
            offs_w = k0 // WC + tl.arange(0, BLOCK_K // WC)
            word = tl.load(w_rows + offs_w[None, :],
                           mask=n_mask[:, None] & (offs_w < row_bytes)[None, :], other=0)
            lvl = _word_levels(word, magic, BLOCK_N, BLOCK_K, CODE_BITS, TWO_ZERO * 0.5)
        else:
            codes = _load_unit_codes(w_rows, k0, n_mask, row_bytes, CODE_BITS, UNITS, PER_UNIT)
            codes = tl.reshape(codes, [BLOCK_N, BLOCK_K])  # column k0 + u * PER_UNIT + p, in order
            lvl = codes.to(tl.float32) * 2.0 - TWO_ZERO  # exact small integers
        if SCALE_MODE == 2:
            s = tl.load(s_rows[:, None] + ((offs_k // GROUP_SIZE) * stride_sg)[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=1.0)
            w = (lvl * tl.maximum(s.to(tl.float32), SCALE_EPS_)).to(dot_dtype)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
        elif SCALE_MODE == 1:
            s = tl.load(s_rows + (k0 // GROUP_SIZE) * stride_sg, mask=n_mask, other=1.0)
            s = tl.maximum(s.to(tl.float32), SCALE_EPS_)
            part = tl.dot(a, tl.trans(lvl.to(dot_dtype)), input_precision=DOT_PRECISION)
            acc += part * s[None, :]
        else:
            acc = tl.dot(a, tl.trans(lvl.to(dot_dtype)), acc, input_precision=DOT_PRECISION)
    if SCALE_MODE == 0:
        s = tl.load(s_rows, mask=n_mask, other=1.0)
        acc = acc * tl.maximum(s.to(tl.float32), SCALE_EPS_)[None, :]
    if WORDS_IN:
        acc = acc * (2.0 * HALF_STEP)  # levels were code - zero
    else:
        acc = acc * HALF_STEP  # levels were 2 * (code - zero)

    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=o_mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


# ----------------------------------------------------------------------------------------------
# Configs and launch
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration. ``kind`` is "gemv" (no tensor cores, any format), "gemvw" (the
    word GEMV: b = 1, 2, 4 on word-aligned rows) or "gemm" (tl.dot)."""

    kind: str
    block_n: int
    block_k: int
    block_m: int = 1
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 2

    def check(self) -> "KernelConfig":
        def pow2(v):
            return v >= 1 and (v & (v - 1)) == 0

        if self.kind not in KERNEL_KINDS:
            raise ValueError(f"KernelConfig.kind must be one of {KERNEL_KINDS}, got {self.kind!r}")
        if not all(pow2(v) for v in (self.block_n, self.block_k, self.block_m, self.num_warps)):
            raise ValueError(f"block sizes and num_warps must be powers of two: {self}")
        if self.block_k < 8:
            raise ValueError(f"block_k must be >= 8 (a tile holds whole units of 8 codes): {self}")
        if self.kind in ("gemvw", "gemmw") and self.block_k < 32:
            raise ValueError(f"{self.kind} needs block_k >= 32 (whole 32-bit words of codes): {self}")
        if self.kind in ("gemm", "gemmw") and min(self.block_m, self.block_n, self.block_k) < 16:
            raise ValueError(f"tl.dot tiles need BLOCK_M/N/K >= 16 (GPU-legal): {self}")
        if self.split_k < 1 or self.group_m < 1 or self.num_stages < 1:
            raise ValueError(f"split_k, group_m and num_stages must be >= 1: {self}")
        return self

    @classmethod
    def from_any(cls, cfg) -> "KernelConfig":
        if isinstance(cfg, KernelConfig):
            return cfg.check()
        if isinstance(cfg, dict):
            return cls(**cfg).check()
        raise TypeError(f"config must be a KernelConfig or a dict of its fields, got {type(cfg)}")


@dataclass(frozen=True)
class Problem:
    """What a launch depends on besides the config (also the autotuner's raw key material)."""

    M: int
    N: int
    K: int
    bits: float
    code_bits: int
    groups: int
    x_dtype: torch.dtype
    out_dtype: torch.dtype
    dot_precision: Optional[str]
    device: str  # device name (part of the tuning key)
    num_sms: int = 1  # streaming multiprocessors (0/1 on the CPU interpreter)
    smem_bytes: int = 0  # shared memory a block may opt into (0: unknown)
    word_aligned: bool = False  # packed rows readable as int32 words (see words_view)

    @property
    def group_size(self) -> int:
        return self.K // self.groups


def words_view(packed: torch.Tensor) -> Optional[torch.Tensor]:
    """``packed`` reinterpreted as int32 words ``[N, row_bytes / 4]`` when every row is a whole
    number of 4-byte-aligned words (row bytes, row stride and data pointer divisible by 4), else
    None. Word ``j`` of a row holds its bytes ``4j .. 4j + 3`` little-endian, i.e. the codes'
    bit stream unchanged (CUDA GPUs and x86 are little-endian)."""
    if packed.dim() != 2 or packed.shape[0] == 0 or packed.shape[1] == 0:
        return None
    if packed.shape[1] % 4 or packed.stride(1) != 1 or packed.data_ptr() % 4:
        return None
    if packed.shape[0] > 1 and packed.stride(0) % 4:
        return None
    return packed.view(torch.int32)


def word_kernel_ok(problem: Problem, cfg: KernelConfig) -> bool:
    """Whether the "gemvw" config can serve the problem: 1/2/4-bit codes (not 3: its codes
    straddle words), word-aligned rows, per-row scales or groups that hold whole K tiles, and an
    M small enough for the GEMV grid."""
    return (problem.code_bits in (1, 2, 4) and problem.word_aligned and problem.M <= GEMV_MAX_M
            and cfg.block_k % (32 // problem.code_bits) == 0
            and (problem.groups == 1 or problem.group_size % cfg.block_k == 0))


def word_gemm_ok(problem: Problem, cfg: KernelConfig) -> bool:
    """Whether the "gemmw" config can serve the problem: 1/2/4-bit codes, word-aligned rows and
    K tiles of whole words (any scale layout; per-element group scales included)."""
    return (problem.code_bits in (1, 2, 4) and problem.word_aligned
            and cfg.block_k % (32 // problem.code_bits) == 0)


def scale_mode(problem: Problem, cfg: KernelConfig) -> int:
    """0: per-row scale in the epilogue; 1: one scale per K tile; 2: per-element scale gather."""
    if problem.groups == 1:
        return 0
    return 1 if problem.group_size % cfg.block_k == 0 else 2


def split_plan(K: int, block_k: int, split_k: int):
    """(splits actually launched, K columns per split); every split starts on a tile boundary."""
    k_tiles = triton.cdiv(K, block_k)
    split = max(1, min(split_k, k_tiles))
    tiles_per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, tiles_per_split)  # no empty splits
    return split, tiles_per_split * block_k


def _per_unit(code_bits: int) -> int:
    """Codes per unit of ``_load_unit_codes``: 8 for b = 3 (three bytes), else 8 / b (one byte)."""
    return 8 if code_bits == 3 else 8 // code_bits


def _launch(problem: Problem, cfg: KernelConfig, x2, packed, scale) -> torch.Tensor:
    M, N, K = problem.M, problem.N, problem.K
    fmt = get_format(problem.bits)
    mode = scale_mode(problem, cfg)
    split, k_per_split = split_plan(K, cfg.block_k, cfg.split_k)
    atomic = split > 1
    if atomic:
        buf = torch.zeros((M, N), dtype=torch.float32, device=x2.device)
    else:
        buf = torch.empty((M, N), dtype=problem.out_dtype, device=x2.device)
    common = dict(
        CODE_BITS=fmt.code_bits,
        TWO_ZERO=float(2 * fmt.zero),
        HALF_STEP=float(fmt.step / 2),
        SCALE_MODE=mode,
        GROUP_SIZE=problem.group_size if mode else 1,
        SCALE_EPS_=SCALE_EPS,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        ATOMIC=atomic,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if cfg.kind in ("gemv", "gemvw") and M > 65535:
        raise ValueError(f"the GEMV kernels serve M <= 65535 (grid axis 2), got M={M}")
    if cfg.kind == "gemvw":
        words = words_view(packed) if word_kernel_ok(problem, cfg) else None
        if words is None:
            raise ValueError(
                f"triton_linear: config {cfg} cannot serve this problem (the word GEMV needs 1/2/4-bit "
                f"codes, M <= {GEMV_MAX_M}, rows of whole 4-byte-aligned words and groups holding "
                f"whole K tiles): M={M}, N={N}, K={K}, bits={problem.bits}, "
                f"packed {tuple(packed.shape)} strides {tuple(packed.stride())}, groups={problem.groups}")
        grid = (triton.cdiv(N, cfg.block_n), split, M)
        _gemv_words_kernel[grid](
            x2, words, scale, buf,
            N, K, words.shape[1], k_per_split,
            x2.stride(0), buf.stride(0), words.stride(0), scale.stride(0), scale.stride(1), 0,
            EVEN_K=K % cfg.block_k == 0,
            **common,
        )
    elif cfg.kind == "gemv":
        grid = (triton.cdiv(N, cfg.block_n), split, M)
        _gemv_kernel[grid](
            x2, packed, scale, buf,
            N, K, packed.shape[1], k_per_split,
            x2.stride(0), buf.stride(0), packed.stride(0), scale.stride(0), scale.stride(1),
            PER_UNIT=_per_unit(fmt.code_bits), **common,
        )
    else:
        w = packed
        if cfg.kind == "gemmw":
            w = words_view(packed) if word_gemm_ok(problem, cfg) else None
            if w is None:
                raise ValueError(
                    f"triton_linear: config {cfg} cannot serve this problem (the word GEMM needs "
                    f"1/2/4-bit codes and rows of whole 4-byte-aligned words): M={M}, N={N}, K={K}, "
                    f"bits={problem.bits}, packed {tuple(packed.shape)} strides {tuple(packed.stride())}")
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
        _gemm_kernel[grid](
            x2, w, scale, buf,
            M, N, K, w.shape[1], k_per_split,
            x2.stride(0), buf.stride(0), w.stride(0), scale.stride(0), scale.stride(1), 0,
            BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m, DOT_PRECISION=problem.dot_precision,
            PER_UNIT=_per_unit(fmt.code_bits), WORDS_IN=cfg.kind == "gemmw", **common,
        )
    if atomic and problem.out_dtype != torch.float32:
        return buf.to(problem.out_dtype)
    return buf


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def _validate(x, packed, scale, bits, out_dtype):
    if not all(isinstance(t, torch.Tensor) for t in (x, packed, scale)):
        raise TypeError(
            "triton_linear: x, packed and scale must be tensors, got "
            f"{type(x).__name__}, {type(packed).__name__}, {type(scale).__name__}"
        )
    supported = ", ".join(_dtype_name(d) for d in SUPPORTED_DTYPES)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"triton_linear: activations of dtype {_dtype_name(x.dtype)} (shape {tuple(x.shape)}) "
            f"are not supported; supported: {supported}"
        )
    if scale.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"triton_linear: scale of dtype {_dtype_name(scale.dtype)} (shape {tuple(scale.shape)}) "
            f"is not supported; supported: {supported}"
        )
    if out_dtype is not None and out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"triton_linear: out_dtype={out_dtype} is not supported; supported: {supported}"
        )
    if scale.dim() == 2 and scale.shape[1] == 0:  # check_linear_args would divide by zero
        raise ValueError(f"triton_linear: scale of shape {tuple(scale.shape)} has no groups "
                         "(expected [N, 1] or [N, K // group_size])")
    # Shapes, packed dtype, K match, devices agree (the op's own checks, same messages).
    fmt = check_linear_args(x, packed, scale, bits)
    dev = packed.device
    if interpreting():
        if dev.type != "cpu":
            raise ValueError(
                f"triton_linear: under TRITON_INTERPRET=1 the tensors must be on the CPU, got {dev}"
            )
    elif dev.type != "cuda":
        raise ValueError(
            f"triton_linear: tensors must be on a CUDA device, got {dev} (x {tuple(x.shape)}, "
            f"packed {tuple(packed.shape)}); use paretoq_ao.ops.reference_linear on the CPU or "
            "set TRITON_INTERPRET=1 before importing triton to run the kernels interpreted"
        )
    if packed.shape[1] and packed.stride(1) != 1:
        raise ValueError(
            f"triton_linear: packed rows must be contiguous (stride(1) == 1), got strides "
            f"{tuple(packed.stride())} for shape {tuple(packed.shape)}"
        )
    return fmt


def _dot_precision(x_dtype) -> Optional[str]:
    if x_dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def make_problem(x2, packed, scale, fmt, out_dtype) -> Problem:
    M, K = x2.shape
    name, sms, smem = _device_info(packed.device)
    return Problem(
        M=M, N=packed.shape[0], K=K, bits=fmt.bits, code_bits=fmt.code_bits,
        groups=scale.shape[1], x_dtype=x2.dtype, out_dtype=out_dtype,
        dot_precision=_dot_precision(x2.dtype), device=name, num_sms=sms, smem_bytes=smem,
        word_aligned=words_view(packed) is not None,
    )


_DEVICE_INFO = {}


def _device_info(dev: torch.device):
    key = (dev.type, dev.index)
    if key not in _DEVICE_INFO:
        if dev.type == "cuda":
            props = torch.cuda.get_device_properties(dev)
            smem = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
            _DEVICE_INFO[key] = (props.name, int(props.multi_processor_count), smem)
        else:
            _DEVICE_INFO[key] = (dev.type, 1, 0)
    return _DEVICE_INFO[key]


def _prepare(x, packed, scale, bits, out_dtype):
    """Validate and normalise the arguments: (problem, x2 [M, K], scale, out_dtype) or None
    for an empty problem."""
    fmt = _validate(x, packed, scale, bits, out_dtype)
    out_dtype = out_dtype or x.dtype
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if K and x2.shape[0] and x2.stride(-1) != 1:
        x2 = x2.contiguous()  # the K dimension must be unit-stride (documented copy)
    if x2.shape[0] == 0 or packed.shape[0] == 0 or K == 0:
        return None, x2, scale, out_dtype
    if interpreting():  # the interpreter has no bf16 arithmetic: compute in fp32
        if x2.dtype == torch.bfloat16:
            x2 = x2.float()
        if scale.dtype == torch.bfloat16:
            scale = scale.float()
    kernel_out = torch.float32 if (interpreting() and out_dtype == torch.bfloat16) else out_dtype
    return make_problem(x2, packed, scale, fmt, kernel_out), x2, scale, out_dtype


def triton_linear(x, packed, scale, bits, out_dtype=None, *, config=None) -> torch.Tensor:
    """``x [..., K] @ dequantize(packed, scale, bits).T`` -> ``[..., N]`` with fused Triton kernels.

    Same contract as ``paretoq_ao.ops.reference_linear`` (packed layout of packing.py, scale
    ``[N, 1]`` or ``[N, K // group_size]``, bits 1/1.58/2/3/4); x in float16/bfloat16/float32 on
    a CUDA device (CPU tensors under ``TRITON_INTERPRET=1``). ``out_dtype`` defaults to x's dtype.
    ``config`` (a ``KernelConfig`` or dict of its fields) bypasses the autotuner (tests, tuning
    experiments). A non-unit-stride last dimension of ``x`` is copied once with ``.contiguous()``.

    Under the interpreter bfloat16 activations/scales are computed in float32 (the interpreter has
    no bf16 arithmetic) and the result is cast back.
    """
    problem, x2, scale, out_dtype = _prepare(x, packed, scale, bits, out_dtype)
    lead = tuple(x.shape[:-1])
    N = packed.shape[0]
    if problem is None:
        return torch.zeros((*lead, N), dtype=out_dtype, device=x.device)

    from .tuning import get_config  # local import: tuning imports this module

    if config is not None:
        cfg = KernelConfig.from_any(config)
    else:
        cfg = get_config(problem, lambda c: _launch(problem, c, x2, packed, scale))
    out = _launch(problem, cfg, x2, packed, scale)
    if out.dtype != out_dtype:
        out = out.to(out_dtype)
    return out.reshape(*lead, N)


def supports(x, packed, scale, bits, out_dtype=None) -> bool:
    """True when ``triton_linear`` accepts these arguments (no exception), e.g. to route
    ``paretoq::linear`` on CUDA: CUDA tensors (CPU under the interpreter), x / scale / out dtype in
    float16, bfloat16, float32, a known bit width, consistent shapes, packed rows contiguous."""
    try:
        _validate(x, packed, scale, bits, out_dtype)
    except (TypeError, ValueError):
        return False
    return True
