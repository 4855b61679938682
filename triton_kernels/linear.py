"""Fused Triton kernels for ``paretoq::linear``: ``x [..., K] @ dequantize(packed, scale).T``.

Packed layout read
------------------
The kernels read the rowbits layout of ``paretoq_ao/packing.py`` (1, 2, 3, 4 bits; ternary's
trits5 layout has its own kernel, ``trits5.py``, which ``triton_linear`` calls) directly, with no
repacking: ``packed`` is uint8 ``[N, ceil(K * b / 8)]`` (``b`` = ``code_bits``
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
* ``_gemv_words_kernel`` ("gemvw"; every format, on rows of whole 4-byte words): the GEMV
  that is the default where it applies; see "The word kernels" below. Same grid and split-K scheme
  as ``_gemv_kernel``.
* ``_gemm_kernel`` (2 <= M): ``tl.dot`` tiles (all block sizes >= 16), grouped (``GROUP_M``)
  program order for L2 reuse, optional split-K with the same fp32 atomic scheme (small M, where the
  op is memory bound and N tiles alone do not fill the GPU). The small-M (2..64) and large-M paths
  use this kernel with different config sets; its word variant ("gemmw", ``WORDS_IN``) reads
  word units like the word GEMV.

The word kernels
----------------
``_gemv_kernel`` keeps the ``[BLOCK_N, units, P]`` shape, and Triton moves the loaded bytes into
that layout through shared memory. On sm_90 a 2-bit tile then costs two barriers, a
shared-memory round trip and about 7 instructions per weight code. ``_gemm_kernel`` converts every
code with I2F and stores it to shared memory one element at a time: about 11. A memory-bound GEMV
cannot afford that, because an H100 streams 2-bit codes faster than it can issue 4 instructions
for each.

The word kernels ("gemvw" ``_gemv_words_kernel`` and "gemmw" ``_gemm_kernel`` with ``WORDS_IN``)
read the same bytes as int32 words. ``words_view`` checks that the rows are whole 4-byte-aligned
words; nothing is repacked. Word ``j`` is bytes ``4j .. 4j+3`` little-endian, so the bit stream is
unchanged. The decode is:

* A *unit* is one word (32 / b codes) for b = 1, 2, 4, and three words (32 codes) for b = 3.
  ``_load_windows`` turns a ``[BLOCK_N, UNITS]`` tile of units into at most five int32 *windows*.
  Each window holds a run of codes at bit positions ``S <= 20``:
  - b = 1, 2, 4: the two 16-bit halves, one bit up;
  - b = 3: the 96-bit unit cut every 21 bits. One shift-or per window joins the codes that
    straddle words.
* Code ``p`` of every unit takes one AND with a constant mask, in place, and one OR with the
  exponent of 2**23. The OR makes the float ``2**23 + code * 2**S``, exact because it fits the
  23-bit mantissa. ``_affine`` then needs one more instruction:
  - the GEMV subtracts 2**23 and multiplies by ``x * 2**-S`` (exact), giving ``code * x``;
  - the GEMM uses one FMA to get ``code - zero``, exact; the one-bit-up halves keep
    ``2**(23-S) + zero`` exact for the half-integer zero points.
  Either way there is no integer-to-float conversion.
* The GEMV keeps one ``[BLOCK_N, UNITS]`` accumulator. It loads the activation of code ``p`` once
  per thread (``x[u * UC + p]``) and shares it across the thread's rows, and never changes layout
  in the K loop: no shared memory, no barrier. The zero point comes out of the sum:
  ``sum((c - z) x) = sum(c x) - z sum(x)``, with ``sum(x)`` taken from the same loads. Per-row
  scales are applied in the epilogue. Group scales, when groups hold whole K tiles, are applied
  once per tile and row: ``(part - z * xsum) * s``.
* The GEMM assembles the ``[BLOCK_N, BLOCK_K]`` tile of levels in registers with a ``tl.join``
  tree (``_t1 .. _t5``, flattened to columns ``u * UC + p`` in order) and feeds ``tl.dot``.

On sm_90 that is about 3.75-4.3 instructions per code for the GEMV, against 7-9, and about 6 for
the GEMM's decode, against 11-17. ``benchmarks/kernel_sass.py`` prints these counts for any
config. Rows that are not whole words (e.g. 2-bit with K not a multiple of 16, or a row slice at an
odd offset) stay on the byte kernels. So do groups narrower than the GEMV's K tile. The autotuner
still decides per shape on the GPU: every byte config has its word twin, and both are candidates.

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

import torch
import triton
import triton.language as tl

from paretoq_ao.formats import SCALE_EPS, get_format

from .problem import (  # noqa: F401  - the host-side names are re-exported from here too
    GEMV_MAX_M, KERNEL_KINDS, LAYOUT_READ, SUPPORTED_DTYPES, KernelConfig, Problem, _per_unit, _prepare,
    _validate, _words_for, interpreting, make_problem, rows_are_words, scale_mode, split_plan, supports,
    unit_codes, word_gemm_ok, word_kernel_ok, words_view,
)
from .trits5 import trits5_linear
from .tuning import get_config

__all__ = ["triton_linear", "supports", "KernelConfig", "interpreting", "SUPPORTED_DTYPES", "LAYOUT_READ"]

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


# ----------------------------------------------------------------------------------------------
# Word units (the "gemvw" and "gemmw" kernels; see "The word kernels" in the module docstring)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_words(w_rows, idx, n_mask, row_words, EVEN: tl.constexpr):
    """Words ``idx`` of the rows (int32 ``[BLOCK_N, len(idx)]``); past the row end 0 unless EVEN."""
    if EVEN:
        mask = n_mask[:, None]
    else:
        mask = n_mask[:, None] & (idx < row_words)[None, :]
    return tl.load(w_rows + idx[None, :], mask=mask, other=0)


@triton.jit
def _load_windows(w_rows, u0, offs_u, n_mask, row_words, CODE_BITS: tl.constexpr,
                  EVEN: tl.constexpr):
    """The windows ``W0 .. W4`` (int32 ``[BLOCK_N, UNITS]``) of the word units ``u0 + offs_u``.

    A unit is one word (32 / b codes) for b = 1, 2, 4 and three words (32 codes) for b = 3. Window
    ``W[i]`` holds the codes ``i * CPW .. i * CPW + CPW - 1`` of the unit at bits ``S(p)`` <= 20:
    b = 1, 2, 4: ``W0 = word << 1``, ``W1 = (word >> 15) & 0x1FFFE`` (the 16-bit halves, one bit
    up), CPW = 16 / b, ``S(p) = b * (p mod CPW) + 1``; b = 3: the 96-bit unit cut every 21 bits,
    CPW = 7, ``S(p) = 3p - 21 * (p // 7)``. Bits above a code's mask are ignored. Units past the
    row end load as 0 (``EVEN``: every unit of the tile is inside the row, no column mask).
    """
    if CODE_BITS == 3:
        base = (u0 + offs_u) * 3
        w0 = _load_words(w_rows, base, n_mask, row_words, EVEN)
        w1 = _load_words(w_rows, base + 1, n_mask, row_words, EVEN)
        w2 = _load_words(w_rows, base + 2, n_mask, row_words, EVEN)
        W0 = w0  # stream bits 0 ..
        W1 = ((w0 >> 21) & 0x7FF) | (w1 << 11)  # 21 ..
        W2 = w1 >> 10  # 42 ..
        W3 = ((w1 >> 31) & 1) | (w2 << 1)  # 63 ..
        W4 = w2 >> 20  # 84 ..
    else:
        w = _load_words(w_rows, u0 + offs_u, n_mask, row_words, EVEN)
        W0 = w << 1
        W1 = (w >> 15) & 0x1FFFE
        W2 = W0
        W3 = W0
        W4 = W0
    return W0, W1, W2, W3, W4


@triton.jit
def _affine(f, S: tl.constexpr, ZERO: tl.constexpr, xv, PRODUCT: tl.constexpr):
    """From ``f = 2**23 + code * 2**S`` (exact): ``code * x`` (PRODUCT, the GEMV: one subtraction,
    and x times 2**-S, which is exact) or ``code - zero`` (the GEMM: one FMA, exact since the
    result is a small integer or half-integer and 2**(23-S) + zero is exact for S >= 1 or integer
    zero)."""
    if PRODUCT:
        out = (f - 8388608.0) * (xv * (1.0 / (1 << S)))
    else:
        out = f * (1.0 / (1 << S)) - ((8388608.0 / (1 << S)) + ZERO)
    return out


@triton.jit
def _leaf3(W0, W1, W2, W3, W4, magic, P: tl.constexpr, ZERO: tl.constexpr, xv,
           PRODUCT: tl.constexpr):
    I: tl.constexpr = P // 7
    S: tl.constexpr = 3 * P - 21 * I
    if I == 0:
        src = W0
    elif I == 1:
        src = W1
    elif I == 2:
        src = W2
    elif I == 3:
        src = W3
    else:
        src = W4
    f = ((src & (7 << S)) | magic).to(tl.float32, bitcast=True)
    return _affine(f, S, ZERO, xv, PRODUCT)


@triton.jit
def _leaf124(W0, W1, magic, P: tl.constexpr, B: tl.constexpr, ZERO: tl.constexpr, xv,
             PRODUCT: tl.constexpr):
    I: tl.constexpr = P // (16 // B)
    S: tl.constexpr = B * P - 16 * I + 1
    if I == 0:
        src = W0
    else:
        src = W1
    f = ((src & (((1 << B) - 1) << S)) | magic).to(tl.float32, bitcast=True)
    return _affine(f, S, ZERO, xv, PRODUCT)


@triton.jit
def _leaf(W0, W1, W2, W3, W4, magic, P: tl.constexpr, B: tl.constexpr, ZERO: tl.constexpr, xv,
          PRODUCT: tl.constexpr):
    """Code ``P`` of every unit: one AND with a constant mask and one OR with the exponent of
    2**23 (``magic``, a register so that the mask is the LOP3 immediate), then ``_affine``."""
    if B == 3:
        out = _leaf3(W0, W1, W2, W3, W4, magic, P, ZERO, xv, PRODUCT)
    else:
        out = _leaf124(W0, W1, magic, P, B, ZERO, xv, PRODUCT)
    return out


# tl.join trees: _tL(P, D) holds codes P + D * j, j = 0 .. 2**L - 1, in order along its L joined
# dims (the first join pairs codes UC/2 apart, the last adjacent ones), so that the root _tL(0, 1)
# of a unit of UC = 2**L codes reshapes to columns u * UC + p. All in registers. One function per
# depth rather than one self-recursive function: Triton 3.9 accepts the recursion, but the GPU
# image runs Triton 3.6, where it was never tried.

@triton.jit
def _t1(W0, W1, W2, W3, W4, m, P: tl.constexpr, D: tl.constexpr, B: tl.constexpr, Z: tl.constexpr):
    return tl.join(_leaf(W0, W1, W2, W3, W4, m, P, B, Z, 0.0, False),
                   _leaf(W0, W1, W2, W3, W4, m, P + D, B, Z, 0.0, False))


@triton.jit
def _t2(W0, W1, W2, W3, W4, m, P: tl.constexpr, D: tl.constexpr, B: tl.constexpr, Z: tl.constexpr):
    return tl.join(_t1(W0, W1, W2, W3, W4, m, P, 2 * D, B, Z),
                   _t1(W0, W1, W2, W3, W4, m, P + D, 2 * D, B, Z))


@triton.jit
def _t3(W0, W1, W2, W3, W4, m, P: tl.constexpr, D: tl.constexpr, B: tl.constexpr, Z: tl.constexpr):
    return tl.join(_t2(W0, W1, W2, W3, W4, m, P, 2 * D, B, Z),
                   _t2(W0, W1, W2, W3, W4, m, P + D, 2 * D, B, Z))


@triton.jit
def _t4(W0, W1, W2, W3, W4, m, P: tl.constexpr, D: tl.constexpr, B: tl.constexpr, Z: tl.constexpr):
    return tl.join(_t3(W0, W1, W2, W3, W4, m, P, 2 * D, B, Z),
                   _t3(W0, W1, W2, W3, W4, m, P + D, 2 * D, B, Z))


@triton.jit
def _t5(W0, W1, W2, W3, W4, m, P: tl.constexpr, D: tl.constexpr, B: tl.constexpr, Z: tl.constexpr):
    return tl.join(_t4(W0, W1, W2, W3, W4, m, P, 2 * D, B, Z),
                   _t4(W0, W1, W2, W3, W4, m, P + D, 2 * D, B, Z))


@triton.jit
def _unit_levels(W0, W1, W2, W3, W4, magic, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 CODE_BITS: tl.constexpr, ZERO: tl.constexpr):
    """fp32 ``code - zero`` ``[BLOCK_N, BLOCK_K]`` of a tile of word units (the GEMM decode)."""
    if CODE_BITS == 4:  # 8 codes a unit
        t = _t3(W0, W1, W2, W3, W4, magic, 0, 1, CODE_BITS, ZERO)
    elif CODE_BITS == 2:  # 16
        t = _t4(W0, W1, W2, W3, W4, magic, 0, 1, CODE_BITS, ZERO)
    else:  # 32 (b = 1 and b = 3)
        t = _t5(W0, W1, W2, W3, W4, magic, 0, 1, CODE_BITS, ZERO)
    return tl.reshape(t, [BLOCK_N, BLOCK_K])


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
    """GEMV over the packed rows read as int32 word units (see "The word kernels" above)."""
    UC: tl.constexpr = 32 if CODE_BITS == 3 else 32 // CODE_BITS  # codes per unit
    UNITS: tl.constexpr = BLOCK_K // UC
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    offs_u = tl.arange(0, UNITS)
    w_rows = w_ptr + offs_n64[:, None] * stride_wn
    s_rows = s_ptr + offs_n64 * stride_sn
    x_ptrs = x_ptr + pid_m.to(tl.int64) * stride_xm + offs_u * UC  # column of code 0 of each unit
    # A runtime 0 keeps the exponent pattern in a register, so that each code's mask is the
    # immediate operand of one LOP3 ((window & mask) | magic).
    magic = 0x4B000000 | zero_i

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.full([BLOCK_N, UNITS], 0.0, tl.float32)
    xsum = tl.full([UNITS], 0.0, tl.float32)
    for k_it in range(k_start, k_end, BLOCK_K):
        k0 = tl.multiple_of(k_it, BLOCK_K)  # tiles start on multiples of BLOCK_K
        W0, W1, W2, W3, W4 = _load_windows(w_rows, k0 // UC, offs_u, n_mask, row_words,
                                           CODE_BITS, EVEN_K)
        if SCALE_MODE == 1:
            part = tl.full([BLOCK_N, UNITS], 0.0, tl.float32)
        else:
            part = acc  # per-row scale: accumulate in place, scale in the epilogue
        xw = tl.full([UNITS], 0.0, tl.float32)
        for p in tl.static_range(UC):
            if EVEN_K:
                xv = tl.load(x_ptrs + (k0 + p)).to(tl.float32)
            else:
                xv = tl.load(x_ptrs + (k0 + p), mask=(offs_u * UC + (k0 + p)) < K,
                             other=0.0).to(tl.float32)
            xw += xv
            part += _leaf(W0, W1, W2, W3, W4, magic, p, CODE_BITS, 0.0, xv[None, :], True)
        if SCALE_MODE == 1:  # the tile lies inside one group: one scale per row
            s = tl.load(s_rows + (k0 // GROUP_SIZE) * stride_sg, mask=n_mask, other=1.0)
            s = tl.maximum(s.to(tl.float32), SCALE_EPS_)
            acc += (part - (TWO_ZERO * 0.5) * xw[None, :]) * s[:, None]
        else:
            acc = part
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


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in grouped order: GROUP_M row tiles share the
    weight tiles they read while those are in L2."""
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + ((pid % num_pid_in_group) % group_size_m), (pid % num_pid_in_group) // group_size_m


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
    counts words; the tile is decoded by ``_unit_levels`` to ``code - zero``. Otherwise bytes,
    decoded by ``_load_unit_codes`` to ``2 * code - 2 * zero``."""
    UNITS: tl.constexpr = BLOCK_K // PER_UNIT
    UC: tl.constexpr = 32 if CODE_BITS == 3 else 32 // CODE_BITS  # codes per word unit
    magic = 0x4B000000 | zero_i  # a register: the masks of _leaf become LOP3 immediates
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
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
            W0, W1, W2, W3, W4 = _load_windows(w_rows, k0 // UC, tl.arange(0, BLOCK_K // UC),
                                               n_mask, row_bytes, CODE_BITS, False)
            lvl = _unit_levels(W0, W1, W2, W3, W4, magic, BLOCK_N, BLOCK_K, CODE_BITS,
                               TWO_ZERO * 0.5)
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


def _launch(problem: Problem, cfg: KernelConfig, x2, packed, scale) -> torch.Tensor:
    M, N, K = problem.M, problem.N, problem.K
    if cfg.kind in ("gemv", "gemvw") and M > 65535:
        raise ValueError(f"the GEMV kernels serve M <= 65535 (grid axis 2), got M={M}")
    # the weights as the kernel reads them (checked before anything is allocated)
    w = _words_for(problem, cfg, packed) if cfg.kind in ("gemvw", "gemmw") else packed
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
    if cfg.kind == "gemvw":
        grid = (triton.cdiv(N, cfg.block_n), split, M)
        _gemv_words_kernel[grid](
            x2, w, scale, buf,
            N, K, w.shape[1], k_per_split,
            x2.stride(0), buf.stride(0), w.stride(0), scale.stride(0), scale.stride(1), 0,
            EVEN_K=K % cfg.block_k == 0,
            **common,
        )
    elif cfg.kind == "gemv":
        grid = (triton.cdiv(N, cfg.block_n), split, M)
        _gemv_kernel[grid](
            x2, w, scale, buf,
            N, K, w.shape[1], k_per_split,
            x2.stride(0), buf.stride(0), w.stride(0), scale.stride(0), scale.stride(1),
            PER_UNIT=_per_unit(fmt.code_bits), **common,
        )
    else:
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




def triton_linear(x, packed, scale, bits, out_dtype=None, *, config=None, validate=True) -> torch.Tensor:
    """``x [..., K] @ dequantize(packed, scale, bits).T`` -> ``[..., N]`` with fused Triton kernels.

    Same contract as ``paretoq_ao.ops.reference_linear`` (packed layout of packing.py, scale
    ``[N, 1]`` or ``[N, K // group_size]``, bits 1/1.58/2/3/4); x in float16/bfloat16/float32 on
    a CUDA device (CPU tensors under ``TRITON_INTERPRET=1``). ``out_dtype`` defaults to x's dtype.
    ``config`` (a ``KernelConfig`` or dict of its fields) bypasses the autotuner (tests, tuning
    experiments). A non-unit-stride last dimension of ``x`` is copied once with ``.contiguous()``.
    ``validate=False`` skips the argument checks (the ``paretoq::linear`` op has made them).

    Under the interpreter bfloat16 activations/scales are computed in float32 (the interpreter has
    no bf16 arithmetic) and the result is cast back.
    """
    problem, x2, scale, out_dtype = _prepare(x, packed, scale, bits, out_dtype, validate)
    lead = tuple(x.shape[:-1])
    N = packed.shape[0]
    if problem is None:
        return torch.zeros((*lead, N), dtype=out_dtype, device=x.device)

    if get_format(bits).storage == "trits5":  # ternary, 5 trits per byte: its own kernel (trits5.py)
        out = trits5_linear(x2, packed, scale, bits, problem.out_dtype)
        return (out if out.dtype == out_dtype else out.to(out_dtype)).reshape(*lead, N)

    if config is not None:
        cfg = KernelConfig.from_any(config)
    else:
        cfg = get_config(problem, lambda c: _launch(problem, c, x2, packed, scale))
    out = _launch(problem, cfg, x2, packed, scale)
    if out.dtype != out_dtype:
        out = out.to(out_dtype)
    return out.reshape(*lead, N)
