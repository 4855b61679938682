"""ParetoQ codes -> GGUF weight blocks, one traits table for every GGUF type the exporter writes.

Every ParetoQ format dequantizes to ``(code - zero) * step * alpha`` (formats.py). Written as an
integer *lattice* ``value = L * u`` -- ``L = (code - zero) * m`` and ``u = step * alpha / m``, with
``m = 2`` where ``zero`` is fractional (binary, 2-bit SEQ) and 1 otherwise -- each format is

| bits | L                  | u          |
|------|--------------------|------------|
| 1    | -1, +1             | alpha      |
| 1.58 | -1, 0, +1          | 2/3 alpha  |
| 2    | -3, -1, +1, +3     | alpha / 4  |
| 3    | -4 .. 3            | alpha      |
| 4    | -8 .. 7            | alpha      |

and a GGUF type stores the same weights when its blocks hold ``L`` and ``u``:

* ``Q8_0`` (``d * q``, 32 per fp16 ``d``) and ``Q4_0`` (``d * (q - 8)``): ``q = L`` / ``L + 8``,
  ``d = u`` -- exact for every format. gguf's own quantizers pick ``d`` from the block maximum,
  which is another grid, so these blocks are built here from the codes.
* ``TQ1_0`` / ``TQ2_0`` (``d * (q - 1)``, one fp16 ``d`` per 256): ternary and binary, written by
  gguf's own quantizer (``d`` = block max |w|, ``q = round(w / d)``) fed ``L * d``, which it
  returns as exactly ``L`` and ``d`` (``d = u`` for a block of one alpha).
* ``Q3_K`` (``d * s_j * (q - 4)``, 16 integer sub-scales ``s_j`` of 16 weights per 256): ``q = L + 4``
  and ``s_j = 1``, ``d = u`` for one alpha per row (1, 1.58, 2, 3 bits).
* ``Q2_K`` (``d * sc_j * q - dmin * m_j``, 4-bit ``sc_j`` / ``m_j`` per 16 weights, q 0..3): 2-bit
  SEQ ``L = 2q - 3`` (so ``sc_j = 2``, ``m_j = 3``, ``d = dmin = u``), ternary ``L = q - 1``, binary
  ``L = 2q - 1``.

Exact means up to the fp16 rounding of ``d`` (a relative error below 2^-11). Group-wise scales are
exact where a block's ``d`` covers whole groups (Q8_0 / Q4_0 with group sizes that are multiples of
32; TQ with multiples of 256); with smaller groups the K types approximate each group's ``u`` by an
integer multiple of the block's ``d`` and TQ takes the block's least-squares scale for the codes --
the nearest these types hold.
The exporter measures every tensor with gguf's dequantizers and reports the error per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import numpy as np
import torch

from ..formats import SCALE_EPS, get_format

__all__ = ["GGUFType", "GGUF_TYPES", "DEFAULT_TYPES", "lattice", "lattice_range", "pack_blocks", "type_problem"]


def lattice(codes: torch.Tensor, scale: torch.Tensor, bits) -> Tuple[np.ndarray, np.ndarray]:
    """``(L int8 [N, K], u float32 [N, K])`` with ``L * u`` the dequantized weight (module docstring)."""
    fmt = get_format(bits)
    m = 1 if float(fmt.zero).is_integer() else 2
    n, k = codes.shape
    levels = ((codes.to(torch.float64) - fmt.zero) * m).round().to(torch.int8)
    alpha = scale.detach().to(torch.float32).clamp_min(SCALE_EPS)
    unit = (alpha * (fmt.step / m)).repeat_interleave(k // scale.shape[1], dim=1)
    return levels.numpy(), unit.contiguous().numpy()


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape[:-1], -1)


def _two_bit_fields(q: np.ndarray) -> np.ndarray:
    """[n, 256] values 0..3 -> the 64 bytes of Q2_K / Q3_K ``qs`` (two halves of 128; within a
    half, value ``32 j + l`` in bits 2j of byte l)."""
    q = q.astype(np.uint8).reshape(-1, 2, 4, 32) << np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return np.bitwise_or.reduce(q, axis=2).reshape(-1, 64)


def _block_unit(u: np.ndarray, size: int) -> np.ndarray:
    """The one ``u`` of every ``size``-weight block ([n, K // size]); callers check it is one."""
    return u.reshape(u.shape[0], -1, size)[:, :, 0]


def _pack_q8_0(L: np.ndarray, u: np.ndarray, lo: int, step: int) -> np.ndarray:
    d = _block_unit(u, 32).reshape(-1, 1)
    return np.concatenate([_fp16(d), L.reshape(-1, 32).view(np.uint8)], axis=1)


def _pack_q4_0(L: np.ndarray, u: np.ndarray, lo: int, step: int) -> np.ndarray:
    d = _block_unit(u, 32).reshape(-1, 1)
    q = (L.reshape(-1, 32).astype(np.int16) + 8).astype(np.uint8)
    return np.concatenate([_fp16(d), q[:, :16] | (q[:, 16:] << 4)], axis=1)


def _tq(qtype_name: str) -> Callable:
    """TQ blocks through gguf's own quantizer, fed ``L * d`` with one ``d`` per block: its ``d``
    (the block max) and ``round(w / d)`` are then exactly ``d`` and ``L``. ``d`` is the block's
    least-squares scale for the codes, ``sum(L^2 u) / sum(L^2)``: ``u`` itself when the block has
    one alpha, the nearest single scale otherwise."""
    def pack(L: np.ndarray, u: np.ndarray, lo: int, step: int) -> np.ndarray:
        from gguf import GGMLQuantizationType, quants

        L2 = L.reshape(-1, 256).astype(np.float32) ** 2
        ub = u.reshape(-1, 256)
        uniform = (ub == ub[:, :1]).all(axis=1)
        ls = (L2 * ub).sum(axis=1) / np.maximum(L2.sum(axis=1), 1.0)
        d = np.where(uniform, ub[:, 0], ls).astype(np.float32)
        w = L.reshape(-1, 256).astype(np.float32) * d[:, None]
        return quants.quantize(w, getattr(GGMLQuantizationType, qtype_name)).reshape(w.shape[0], -1)

    return pack


def _sub_scales(u16: np.ndarray, mult: float, top: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per 256-block: fp16 ``d`` and integer sub-scales ``s_j`` (1..top) with ``d * s_j`` nearest
    to ``mult * u_j``. A block with one ``u`` gets ``d = u`` and ``s_j = mult``: exact."""
    target = u16 * mult
    uniform = (u16 == u16[:, :1]).all(axis=1)
    d = np.where(uniform, u16[:, 0], target.max(axis=1) / top).astype(np.float16).astype(np.float32)
    s = np.where(uniform[:, None], mult, np.clip(np.rint(target / np.maximum(d[:, None], 1e-30)), 1, top))
    return d, s.astype(np.uint8)


def _pack_q3_k(L: np.ndarray, u: np.ndarray, lo: int, step: int) -> np.ndarray:
    u16 = _block_unit(u, 16).reshape(-1, 16)
    d, s = _sub_scales(u16, 1.0, 31)
    q = (L.reshape(-1, 256).astype(np.int16) + 4).astype(np.uint8)  # 0..7
    hmask = np.bitwise_or.reduce((q >> 2).reshape(-1, 8, 32) << np.arange(8, dtype=np.uint8).reshape(1, 8, 1),
                                 axis=1)
    stored = s + np.uint8(32)
    low = (stored & 0x0F).reshape(-1, 2, 8)
    high = ((stored >> 4) & 0x03).reshape(-1, 4, 4)
    scales = np.concatenate([low[:, 0] | (low[:, 1] << 4),
                             high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)], axis=1)
    return np.concatenate([hmask, _two_bit_fields(q & 3), scales, _fp16(d.reshape(-1, 1))], axis=1)


def _pack_q2_k(L: np.ndarray, u: np.ndarray, lo: int, step: int) -> np.ndarray:
    """``L = step * q + lo`` (2-bit: 2q - 3; ternary: q - 1; binary: 2q - 1), so ``value = d sc q -
    dmin m`` with ``d sc = step u`` and ``dmin m = -lo u``."""
    u16 = _block_unit(u, 16).reshape(-1, 16)
    d, sc = _sub_scales(u16, float(step), 15)
    dmin, m = _sub_scales(u16, float(-lo), 15)
    q = ((L.reshape(-1, 256).astype(np.int16) - lo) // step).astype(np.uint8)
    return np.concatenate([sc | (m << 4), _two_bit_fields(q), _fp16(d.reshape(-1, 1)),
                           _fp16(dmin.reshape(-1, 1))], axis=1)


@dataclass(frozen=True)
class GGUFType:
    """One GGUF weight type the exporter writes (the traits every part of the exporter reads)."""
    name: str  # GGMLQuantizationType member
    block: int  # weights per block (a row's in_features must be a multiple)
    unit: int  # weights sharing one ``u`` exactly (``d``); smaller scale groups are approximated
    sub: int  # weights per integer sub-scale (K types), else ``unit``
    lattice: Tuple[int, int]  # the range of L the blocks hold
    pack: Callable[[np.ndarray, np.ndarray, int, int], np.ndarray]  # (L, u, lowest L, L step)
    bits_per_weight: float

    @property
    def qtype(self):
        from gguf import GGMLQuantizationType

        return getattr(GGMLQuantizationType, self.name)


GGUF_TYPES: Dict[str, GGUFType] = {t.name: t for t in (
    GGUFType("Q8_0", 32, 32, 32, (-127, 127), _pack_q8_0, 8.5),
    GGUFType("Q4_0", 32, 32, 32, (-8, 7), _pack_q4_0, 4.5),
    GGUFType("Q3_K", 256, 256, 16, (-4, 3), _pack_q3_k, 3.4375),
    GGUFType("Q2_K", 256, 256, 16, (-3, 3), _pack_q2_k, 2.625),  # and at most 4 levels
    GGUFType("TQ2_0", 256, 256, 1, (-1, 1), _tq("TQ2_0"), 2.0625),
    GGUFType("TQ1_0", 256, 256, 1, (-1, 1), _tq("TQ1_0"), 1.6875),
)}

# The smallest type that stores each format exactly (per-row scales).
DEFAULT_TYPES = {4: "Q4_0", 3: "Q3_K", 2: "Q2_K", 1.58: "TQ1_0", 1: "TQ1_0"}


def lattice_range(bits) -> Tuple[int, int, int]:
    """(lowest L, highest L, step between neighbouring L) of a format."""
    fmt = get_format(bits)
    m = 1 if float(fmt.zero).is_integer() else 2
    return int(round(-fmt.zero * m)), int(round((fmt.n_codes - 1 - fmt.zero) * m)), m


def type_problem(t: GGUFType, bits, in_features: int, group_size) -> str:
    """Why ``t`` cannot hold a ``bits`` layer of ``in_features`` with ``group_size`` ('' if it can)."""
    lo, hi, step = lattice_range(bits)
    if lo < t.lattice[0] or hi > t.lattice[1] or (t.name == "Q2_K" and (hi - lo) // step > 3):
        return f"{t.name} cannot hold {get_format(bits)} weights"
    if in_features % t.block:
        return f"{t.name} needs in_features divisible by {t.block}, got {in_features}"
    if group_size is not None and group_size % t.sub:
        return f"{t.name} needs group_size divisible by {t.sub}, got {group_size}"
    return ""


def pack_blocks(t: GGUFType, L: np.ndarray, u: np.ndarray, bits) -> np.ndarray:
    """The raw blocks of a ``[N, K]`` lattice of a ``bits`` format: uint8 ``[N, K // block * size]``."""
    lo, _, step = lattice_range(bits)
    return np.ascontiguousarray(t.pack(L, u, lo, step).reshape(L.shape[0], -1))
