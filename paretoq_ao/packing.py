"""The packed weight layouts (the one definition every backend reads).

A weight of shape [N, K] (out_features, in_features) is stored as a ``uint8`` tensor of shape
``[N, packed_row_bytes(K, bits)]``, each row independent. The format's ``storage`` field
(formats.py) says which of the two layouts below holds its codes. Scales are stored separately,
in the weight's dtype, as [N, 1] (per row) or [N, K / group_size] (per group); the dequantized
weight is ``(code - zero) * step * scale`` with ``zero`` / ``step`` from formats.py.

Layout ``rowbits`` (1, 2, 3, 4 bits: ``ceil(K * b / 8)`` bytes per row)
----------------------------------------------------------------------
``b = code_bits``. Each row is an independent little-endian bit stream: code ``k`` of row ``n``
occupies bits ``b*k .. b*k + b - 1`` of that row, where bit ``j`` of the stream is bit ``j % 8`` of
byte ``j // 8`` (least significant bit first):

* for b = 1, 2, 4 codes never straddle a byte (8, 4, 2 codes per byte; code ``k`` sits at bit
  ``b * (k % (8 // b))`` of byte ``k // (8 // b)``);
* for b = 3 every 8 codes fill exactly 3 bytes (24 bits, code ``i`` of the group at bits
  ``3i .. 3i+2`` of the little-endian 24-bit word); codes 2 and 5 of each group straddle bytes;
* the tail of a row (when ``K * b`` is not a multiple of 8) is zero bits.

Layout ``trits5`` (ternary, 1.58 bits: ``ceil(K / 5)`` bytes per row, 1.6 bits per weight)
----------------------------------------------------------------------------------------
Five ternary codes (trits ``t0 .. t4`` in {0, 1, 2}) share one byte::

    v    = 81 t0 + 27 t1 + 9 t2 + 3 t3 + t4          (0 .. 242, t0 the most significant)
    byte = ceil(256 v / 243) = (256 v + 242) // 243

so that decoding needs neither division nor a table: ``s = (byte * 3**i) mod 256`` (in bytes: two
wrapping additions per step from ``s`` of trit ``i - 1``) puts trit ``i`` at the top and
``t_i = (3 s) >> 8 = (s > 85) + (s > 170)``. Only 243 of the 256 byte values are codes; the other
13 (``TRITS5_INVALID_BYTES``) are rejected when a file is loaded.

Bytes are grouped into *words* of 4 (the 32-bit lanes of the CPU kernels): word ``w`` holds codes
``20 w .. 20 w + 19`` of the row in bytes ``4w .. 4w + 3``, code ``20 w + 4 i + j`` as trit ``i`` of
byte ``4w + j``. So trit ``i`` of a word's four bytes is four *consecutive* codes (a "plane"), and
every group size that is a multiple of 4 ends between planes. The last word of a row may be short:
with ``r`` codes left it has ``nb = ceil(r / 5)`` bytes and holds code ``20 W + nb i + j`` as trit
``i`` of byte ``4W + j`` (``j < nb``); trits past the row's end are 0. In general, for word ``w``
with ``nb_w = min(4, row_bytes - 4 w)`` bytes, offset ``o = k - 20 w`` sits in byte ``o % nb_w``,
trit ``o // nb_w``.

Order ``blocked16`` (CPU kernels: ExecuTorch programs, PyTorch CPU)
-----------------------------------------------------------------
Not a storage format of its own: the same codes and scales, regrouped once (``block16``, at export
or load time) so that the C++ kernels read every block of 16 rows as one sequential stream (the
kernels compute 16 / 8 / 4 rows per vector lane; in row order each row is a separate stream, and a
core tracks too few of them to reach the DRAM bandwidth). Rows are padded with zeros to
``Np = ceil(N / 16) * 16`` and each row's bytes to ``Rp`` (``blocked16_row_bytes``: a multiple of
48 bytes for 3-bit codes, of 16 otherwise); then::

    codes  uint8   [Np / 16, Rp / 4, 64]   word w (bytes 4w .. 4w+3) of row n at [n // 16, w, 4 (n % 16) ..]
    scales float32 [Np / 16, G, 16]        scale (n, g) at [n // 16, g, n % 16]

so lane ``i`` of the 64-byte vector ``[b, w]`` is word ``w`` of row ``16 b + i``. ``unblock16``
inverts it exactly.

History: layout ``paretoq-rowbits-v1`` (``LEGACY_LAYOUTS``) stored ternary codes in 2-bit fields
(the rowbits layout at b = 2); files written with it are converted on load (``from_legacy``).
"""

from __future__ import annotations

import torch

from .formats import get_format

__all__ = ["LAYOUT", "LEGACY_LAYOUTS", "pack_codes", "unpack_codes", "packed_row_bytes", "legacy_row_bytes",
           "from_legacy", "trits5_problem", "TRITS5_INVALID_BYTES", "BLOCK_ROWS", "blocked16_row_bytes",
           "block16", "unblock16"]

# The name recorded in every saved artefact: rowbits for 1/2/3/4-bit formats, trits5 for ternary.
LAYOUT = "paretoq-rowbits-v1+trits5-v1"
# Layouts earlier versions wrote, still read (ternary codes in 2-bit fields).
LEGACY_LAYOUTS = ("paretoq-rowbits-v1",)

_POW3 = (81, 27, 9, 3, 1)


def _trits5_byte(v: int) -> int:
    return (256 * v + 242) // 243


# Byte values that encode no 5-trit group.
TRITS5_INVALID_BYTES = tuple(sorted(set(range(256)) - {_trits5_byte(v) for v in range(243)}))


def packed_row_bytes(in_features: int, bits) -> int:
    """Bytes per packed row of a ``bits``-bit weight with ``in_features`` columns."""
    fmt = get_format(bits)
    if fmt.storage == "trits5":
        return (in_features + 4) // 5
    return (in_features * fmt.code_bits + 7) // 8


def legacy_row_bytes(in_features: int, bits) -> int:
    """Bytes per row in ``paretoq-rowbits-v1`` (every format in ``code_bits``-wide fields)."""
    return (in_features * get_format(bits).code_bits + 7) // 8


def _check_codes(codes: torch.Tensor, fmt) -> None:
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= fmt.n_codes:
            raise ValueError(
                f"codes of the {fmt} format must be in [0, {fmt.n_codes}), got values in [{lo}, {hi}]"
            )


def _trits5_slots(k: int, device) -> tuple:
    """For every column of a row of ``k`` codes: its byte index and the weight 3**(4 - trit)."""
    row = (k + 4) // 5
    col = torch.arange(k, device=device)
    w = col // 20
    nb = torch.clamp(row - 4 * w, max=4)
    off = col - 20 * w
    byte = 4 * w + off % nb
    trit = off // nb
    weight = torch.tensor(_POW3, dtype=torch.int32, device=device)[trit]
    return byte, trit, weight


def _pack_trits5(codes: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    row = (k + 4) // 5
    byte, _, weight = _trits5_slots(k, codes.device)
    v = torch.zeros(n, row, dtype=torch.int32, device=codes.device)
    v.scatter_add_(1, byte.expand(n, k), codes.to(torch.int32) * weight)
    return ((v * 256 + 242) // 243).to(torch.uint8)


def _unpack_trits5(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    byte, trit, _ = _trits5_slots(in_features, packed.device)
    q = packed.to(torch.int32)[:, byte]
    pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=packed.device)[trit]
    s = (q * pow3) & 0xFF
    return ((s * 3) >> 8).to(torch.uint8)


def _pack_rowbits(codes: torch.Tensor, b: int) -> torch.Tensor:
    n, k = codes.shape
    k8 = (k + 7) // 8 * 8
    c = torch.zeros(n, k8, dtype=torch.int32, device=codes.device)
    c[:, :k] = codes.to(torch.int32)
    # Every 8 codes form one b-byte little-endian word.
    shifts = torch.arange(8, dtype=torch.int32, device=codes.device) * b
    words = (c.view(n, k8 // 8, 8) << shifts).sum(dim=-1, dtype=torch.int64)
    byte_shifts = torch.arange(b, dtype=torch.int64, device=codes.device) * 8
    out = ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(n, k8 // 8 * b)
    return out[:, : (k * b + 7) // 8].contiguous()


def _unpack_rowbits(packed: torch.Tensor, in_features: int, b: int) -> torch.Tensor:
    n, row = packed.shape
    k8 = (in_features + 7) // 8 * 8
    full = torch.zeros(n, k8 // 8 * b, dtype=torch.int64, device=packed.device)
    full[:, :row] = packed.to(torch.int64)
    byte_shifts = torch.arange(b, dtype=torch.int64, device=packed.device) * 8
    words = (full.view(n, k8 // 8, b) << byte_shifts).sum(dim=-1)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * b
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << b) - 1)
    return codes.reshape(n, k8)[:, :in_features].to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits) -> torch.Tensor:
    """Pack integer codes [N, K] (values < n_codes of the format) into the format's layout above."""
    fmt = get_format(bits)
    _check_codes(codes, fmt)
    if fmt.storage == "trits5":
        return _pack_trits5(codes)
    return _pack_rowbits(codes, fmt.code_bits)


def _check_row(packed: torch.Tensor, in_features: int, fmt, want: int, layout: str) -> None:
    if packed.dim() != 2 or packed.shape[1] != want:
        raise ValueError(
            f"packed rows of shape {tuple(packed.shape)} do not fit in_features={in_features} of the {fmt} "
            f"format in layout {layout} (needs [N, {want}] bytes)"
        )


def unpack_codes(packed: torch.Tensor, in_features: int, bits) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 [N, packed_row_bytes(K, bits)] -> uint8 codes [N, K]."""
    fmt = get_format(bits)
    _check_row(packed, in_features, fmt, packed_row_bytes(in_features, fmt), fmt.storage)
    if fmt.storage == "trits5":
        return _unpack_trits5(packed, in_features)
    return _unpack_rowbits(packed, in_features, fmt.code_bits)


def from_legacy(packed: torch.Tensor, in_features: int, bits) -> torch.Tensor:
    """Repack a weight stored in ``paretoq-rowbits-v1`` into the current layout (only ternary
    changed; other formats are returned as they are). Raises on codes that are no ternary codes."""
    fmt = get_format(bits)
    if fmt.storage != "trits5":
        return packed
    _check_row(packed, in_features, fmt, legacy_row_bytes(in_features, fmt), LEGACY_LAYOUTS[0])
    codes = _unpack_rowbits(packed, in_features, fmt.code_bits)
    if codes.numel() and int(codes.max()) >= fmt.n_codes:
        raise ValueError(f"a ternary weight in layout {LEGACY_LAYOUTS[0]} holds the code {int(codes.max())} "
                         f"(ternary codes are 0, 1, 2)")
    return _pack_trits5(codes)


def trits5_problem(packed: torch.Tensor):
    """Why ``packed`` cannot be trits5 bytes (a byte that encodes no 5-trit group), or None."""
    if packed.numel() == 0 or packed.device.type == "meta":
        return None
    hit = torch.isin(packed, torch.tensor(TRITS5_INVALID_BYTES, dtype=packed.dtype, device=packed.device))
    if not bool(hit.any()):
        return None
    r, c = (int(i) for i in hit.nonzero()[0])
    return (f"byte {int(packed[r, c])} at row {r}, byte {c} encodes no 5 ternary codes (layout trits5: "
            f"valid bytes are ceil(256 v / 243) for v = 0..242)")


BLOCK_ROWS = 16  # rows per block of the blocked16 order


def blocked16_row_bytes(in_features: int, bits) -> int:
    """Padded bytes per row in the blocked16 order (whole steps of the kernels: 48 bytes at 3-bit
    codes, 16 otherwise)."""
    fmt = get_format(bits)
    span = 48 if fmt.storage == "rowbits" and fmt.code_bits == 3 else 16
    return -(-packed_row_bytes(in_features, bits) // span) * span


def block16(packed: torch.Tensor, scale: torch.Tensor, bits, in_features: int):
    """Packed codes [N, row_bytes] and scales [N, G] -> the blocked16 order (module doc):
    (codes uint8 [Np / 16, Rp / 4, 64], scales float32 [Np / 16, G, 16])."""
    fmt = get_format(bits)
    n, rb = packed.shape
    if packed.dtype != torch.uint8:
        raise TypeError(f"block16: packed must be uint8, got {packed.dtype}")
    _check_row(packed, in_features, fmt, packed_row_bytes(in_features, bits), LAYOUT)
    if scale.dim() != 2 or scale.shape[0] != n:
        raise ValueError(f"block16: scale must be [N={n}, G], got shape {tuple(scale.shape)}")
    nb, rp, g = -(-n // BLOCK_ROWS), blocked16_row_bytes(in_features, bits), scale.shape[1]
    codes = packed.new_zeros((nb * BLOCK_ROWS, rp))
    codes[:n, :rb] = packed
    codes = codes.view(nb, BLOCK_ROWS, rp // 4, 4).transpose(1, 2).reshape(nb, rp // 4, 4 * BLOCK_ROWS)
    sc = scale.new_zeros((nb * BLOCK_ROWS, g), dtype=torch.float32)
    sc[:n] = scale
    return codes.contiguous(), sc.view(nb, BLOCK_ROWS, g).transpose(1, 2).contiguous()


def unblock16(codes: torch.Tensor, scales: torch.Tensor, bits, out_features: int, in_features: int):
    """The inverse of ``block16``: (packed [N, row_bytes] uint8, scale [N, G] float32)."""
    rb, rp = packed_row_bytes(in_features, bits), blocked16_row_bytes(in_features, bits)
    nb = -(-out_features // BLOCK_ROWS)
    if codes.dtype != torch.uint8 or tuple(codes.shape) != (nb, rp // 4, 4 * BLOCK_ROWS):
        raise ValueError(f"unblock16: blocked16 codes of a [{out_features}, {in_features}] {get_format(bits)} weight "
                         f"must be uint8 [{nb}, {rp // 4}, {4 * BLOCK_ROWS}], got {codes.dtype} {tuple(codes.shape)}")
    if scales.dim() != 3 or tuple(scales.shape[::2]) != (nb, BLOCK_ROWS):
        raise ValueError(f"unblock16: blocked16 scales must be [{nb}, G, {BLOCK_ROWS}], got {tuple(scales.shape)}")
    packed = codes.view(nb, rp // 4, BLOCK_ROWS, 4).transpose(1, 2).reshape(nb * BLOCK_ROWS, rp)
    scale = scales.transpose(1, 2).reshape(nb * BLOCK_ROWS, scales.shape[1])
    return packed[:out_features, :rb].contiguous(), scale[:out_features].contiguous()
