"""The one table of ParetoQ weight formats.

Every other module (fake quantization, packing, the linear op, the kernels) reads the per-format
constants from here; nothing else branches on the bit width.

A format maps the ratio ``r = W / alpha`` to a *normalised level* ``q`` (the quantized weight is
``q * alpha``) and each level to an unsigned integer *code*:

    code  = round(q / step + zero)            (stored, ``code_bits`` wide)
    value = (code - zero) * step * alpha      (dequantized)

| bits | kind   | levels q                 | n_codes | storage (packing.py)  | zero | step | alpha init    |
|------|--------|--------------------------|---------|-----------------------|------|------|---------------|
| 1    | binary | -1, +1                   | 2       | rowbits, 1-bit fields | 0.5  | 2    | mean abs W    |
| 1.58 | SEQ    | -2/3, 0, +2/3            | 3       | trits5, 5 per byte    | 1    | 2/3  | max abs W     |
| 2    | SEQ    | -3/4, -1/4, +1/4, +3/4   | 4       | rowbits, 2-bit fields | 1.5  | 1/2  | max abs W     |
| 3    | LSQ    | -4 .. 3                  | 8       | rowbits, 3-bit fields | 4    | 1    | max abs W / 3 |
| 4    | LSQ    | -8 .. 7                  | 16      | rowbits, 4-bit fields | 8    | 1    | max abs W / 7 |

``code_bits`` is the width of a code field in the rowbits layout (2 for ternary: the width the
legacy layout paretoq-rowbits-v1 stored it in, and the smallest field that holds a code).

Binary maps ``W == 0`` to ``+alpha`` (the reference's ``sign(0) = 0`` is a third level that one bit
cannot store; see ``fake_quantize``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

__all__ = ["BitFormat", "FORMATS", "ALLOWED_BITS", "get_format"]

# alpha is clamped below at this value inside the quantizer, as in the reference.
SCALE_EPS = 1e-5
# SEQ clips the ratio to +-SEQ_CLIP before rounding (the reference's ``1 - 1e-2``).
SEQ_CLIP = 0.99


@dataclass(frozen=True)
class BitFormat:
    bits: Union[int, float]  # the user-facing name: 1, 1.58, 2, 3, 4
    kind: str  # "binary" | "seq" | "lsq"
    code_bits: int  # width of one code field in the rowbits layout
    zero: float  # code of the level 0 (may be fractional: SEQ has no zero level)
    step: float  # distance between neighbouring normalised levels
    init: str  # "mean" | "max": statistic of |W| that initialises alpha (divided by init_div)
    init_div: float
    grad_qp: float  # Qp_int in the scale's gradient scale 1 / sqrt(numel * Qp_int)
    # ratio range inside which the weight gets a straight-through gradient
    clip_lo: float
    clip_hi: float
    # d(level)/d(alpha) contribution below / above the range (scale gradient)
    grad_lo: float
    grad_hi: float
    # SEQ only: number of half-ranges and the shift of the stretched grid
    seq_levels: float = 0.0
    seq_shift: float = 0.0
    n_codes: int = 0  # number of codes (levels); 0: 2**code_bits
    storage: str = "rowbits"  # packed layout of the codes: "rowbits" | "trits5" (packing.py)

    def __post_init__(self):
        if not self.n_codes:
            object.__setattr__(self, "n_codes", 2**self.code_bits)

    @property
    def name(self) -> str:
        return {"binary": "binary", "seq": "SEQ", "lsq": "LSQ"}[self.kind]

    @property
    def level_values(self) -> list:
        """Normalised levels q, code 0 first."""
        return [(c - self.zero) * self.step for c in range(self.n_codes)]

    def __str__(self) -> str:
        return f"{self.bits}-bit {self.name}"


def _lsq(bits: int) -> BitFormat:
    qp = 2 ** (bits - 1) - 1
    qn = -(2 ** (bits - 1))
    return BitFormat(
        bits=bits, kind="lsq", code_bits=bits, zero=float(-qn), step=1.0, init="max",
        init_div=float(qp), grad_qp=float(qp), clip_lo=float(qn), clip_hi=float(qp),
        grad_lo=float(qn), grad_hi=float(qp),
    )


def _seq(bits: float, levels: float, shift: float, code_bits: int, **kw) -> BitFormat:
    # Largest normalised level reached by the clipped grid, and the reference's out-of-range
    # scale-gradient value (n_levels - shift) / n_levels (1.0 for ternary, 0.75 for 2-bit).
    qp_grad = (levels - shift) / levels
    zero = (levels - shift) if shift else 1.0
    return BitFormat(
        bits=bits, kind="seq", code_bits=code_bits, zero=zero, step=1.0 / levels, init="max",
        init_div=1.0, grad_qp=1.0, clip_lo=-SEQ_CLIP, clip_hi=SEQ_CLIP, grad_lo=-qp_grad,
        grad_hi=qp_grad, seq_levels=levels, seq_shift=shift, **kw,
    )


FORMATS = {
    1: BitFormat(
        bits=1, kind="binary", code_bits=1, zero=0.5, step=2.0, init="mean", init_div=1.0,
        grad_qp=1.0, clip_lo=-1.0, clip_hi=1.0, grad_lo=-1.0, grad_hi=1.0,
    ),
    1.58: _seq(1.58, levels=1.5, shift=0.0, code_bits=2, n_codes=3, storage="trits5"),
    2: _seq(2, levels=2.0, shift=0.5, code_bits=2),
    3: _lsq(3),
    4: _lsq(4),
}

ALLOWED_BITS = tuple(FORMATS)


def get_format(bits) -> BitFormat:
    """Look up a format by its bit width (1, 1.58, 2, 3, 4; "1.58" and "ternary" also accepted)."""
    if isinstance(bits, BitFormat):
        return bits
    if type(bits) in (int, float) and bits in FORMATS:  # fast path, also traceable by dynamo
        return FORMATS[bits]
    key = bits
    if isinstance(bits, str):
        s = bits.strip().lower()
        if s == "ternary":
            key = 1.58
        else:
            try:
                key = float(s)
            except ValueError:
                key = None
    if isinstance(key, bool) or not isinstance(key, (int, float)):
        key = None
    if key is not None:
        for k, fmt in FORMATS.items():
            if math.isclose(float(key), float(k), abs_tol=1e-9):
                return fmt
    raise ValueError(
        f"bits={bits!r} is not supported; allowed values are "
        f"{', '.join(str(b) for b in ALLOWED_BITS)} (1.58 = ternary)"
    )
