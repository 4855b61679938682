"""The packed layouts (rowbits, trits5) and the ``paretoq::linear`` op, checked against oracles.

Oracles written here from the documentation, independent of the code under test:
* a pure-Python bit-stream packer: each row is one little-endian integer in which code ``k``
  occupies bits ``b*k .. b*k+b-1`` (``int.to_bytes(..., "little")``);
* a pure-Python trits5 packer / unpacker (base-3 digits with ``//`` and ``%``, not the
  multiply-and-shift decode of the code under test);
* hand-computed byte examples;
* for the op: dequantization from the level table of PARETOQ.md in float64, then ``x @ W.T``.
"""

from __future__ import annotations

import re

import pytest
import torch

import paretoq_ao as pq
from torchao.prototype.paretoq.models.utils_quant import (
    LsqBinaryTernaryExtension,
    StretchedElasticQuant,
)

BITS = [1, 1.58, 2, 3, 4]
ROWBITS = [1, 2, 3, 4]  # formats in the rowbits layout (ternary: trits5)
CODE_BITS = {1: 1, 1.58: 2, 2: 2, 3: 3, 4: 4}
# normalised levels, code 0 first (PARETOQ.md)
LEVELS = {
    1: [-1.0, 1.0],
    1.58: [-2.0 / 3.0, 0.0, 2.0 / 3.0],
    2: [-0.75, -0.25, 0.25, 0.75],
    3: [float(v) for v in range(-4, 4)],
    4: [float(v) for v in range(-8, 8)],
}


def _id(v):
    return str(v).replace("torch.", "")


# --------------------------------------------------------------------------------------------
# independent reference packer


def ref_pack(codes, code_bits):
    """codes: list of rows (lists of ints) -> uint8 tensor [N, ceil(K*b/8)]."""
    rows = []
    for row in codes:
        acc = 0
        for k, c in enumerate(row):
            acc |= int(c) << (code_bits * k)
        nbytes = (len(row) * code_bits + 7) // 8
        rows.append(list(acc.to_bytes(nbytes, "little")))
    return torch.tensor(rows, dtype=torch.uint8).reshape(len(codes), -1)


def ref_unpack(packed, k, code_bits):
    out = []
    for row in packed.tolist():
        acc = int.from_bytes(bytes(row), "little")
        out.append([(acc >> (code_bits * i)) & ((1 << code_bits) - 1) for i in range(k)])
    return out


def ref_pack_trits5(codes):
    """The trits5 layout of packing.py, from its documentation: ceil(K / 5) bytes per row, words of
    4 bytes (the last one nb = ceil(r / 5) bytes), offset o of word w in byte o % nb, trit o // nb,
    v = sum t_i 3**(4 - i), byte = ceil(256 v / 243)."""
    rows = []
    for row in codes:
        k = len(row)
        rb = -(-k // 5)
        v = [0] * rb
        for col, c in enumerate(row):
            w, o = divmod(col, 20)
            nb = min(4, rb - 4 * w)
            v[4 * w + o % nb] += int(c) * 3 ** (4 - o // nb)
        rows.append([-(-256 * x // 243) for x in v])
    return torch.tensor(rows, dtype=torch.uint8).reshape(len(codes), -1)


def ref_unpack_trits5(packed, k):
    out = []
    for row in packed.tolist():
        rb = len(row)
        v = [b * 243 // 256 for b in row]  # the base-3 number each byte encodes
        codes = []
        for col in range(k):
            w, o = divmod(col, 20)
            nb = min(4, rb - 4 * w)
            codes.append(v[4 * w + o % nb] // 3 ** (4 - o // nb) % 3)
        out.append(codes)
    return out


def ref_row_bytes(k, bits):
    return -(-k // 5) if bits == 1.58 else (k * CODE_BITS[bits] + 7) // 8


def ref_pack_bits(codes, bits):
    """codes: int tensor [N, K] -> the documented layout of ``bits``."""
    if bits == 1.58:
        return ref_pack_trits5(codes.tolist())
    return ref_pack(codes.tolist(), CODE_BITS[bits])


def random_codes(n, k, bits, seed=0, full_range=True):
    gen = torch.Generator().manual_seed(seed)
    hi = 2 ** CODE_BITS[bits] if full_range else len(LEVELS[bits])
    return torch.randint(0, hi, (n, k), generator=gen, dtype=torch.int64).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# round trip and layout


@pytest.mark.parametrize("bits", BITS, ids=_id)
@pytest.mark.parametrize("k", [1, 3, 5, 7, 8, 9, 13, 31, 33, 100])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_round_trip_and_layout(bits, k, n):
    b = CODE_BITS[bits]
    # ternary's valid codes are {0, 1, 2}; the other formats use every b-bit value
    codes = random_codes(n, k, bits, seed=k * 10 + n, full_range=bits != 1.58)
    packed = pq.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (n, ref_row_bytes(k, bits))
    assert packed.is_contiguous()
    assert torch.equal(packed, ref_pack_bits(codes, bits))
    unpacked = pq.unpack_codes(packed, k, bits)
    assert unpacked.dtype == torch.uint8
    assert unpacked.shape == (n, k)
    assert torch.equal(unpacked, codes)


@pytest.mark.parametrize("bits", ROWBITS, ids=_id)
@pytest.mark.parametrize("k", [3, 9, 13])
def test_unpack_reads_reference_bytes(bits, k):
    # bytes produced by the reference packer (random, all bits used) decode as the reference says
    b = CODE_BITS[bits]
    gen = torch.Generator().manual_seed(k)
    codes = torch.randint(0, 2**b, (4, k), generator=gen).tolist()
    packed = ref_pack(codes, b)
    assert pq.unpack_codes(packed, k, bits).tolist() == codes
    assert ref_unpack(packed, k, b) == codes


@pytest.mark.parametrize("bits", ROWBITS, ids=_id)
def test_tail_bits_are_zero(bits):
    b = CODE_BITS[bits]
    k = 5  # 5*b is not a multiple of 8 for every b here
    codes = torch.full((3, k), (1 << b) - 1, dtype=torch.uint8)
    packed = pq.pack_codes(codes, bits)
    total = packed.shape[1] * 8
    used = k * b
    stream = int.from_bytes(bytes(packed[0].tolist()), "little")
    assert stream >> used == 0, f"tail bits {used}..{total} not zero"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64, torch.int16])
def test_pack_accepts_integer_code_dtypes(dtype):
    codes = torch.tensor([[1, 2, 3, 0, 1]], dtype=dtype)
    assert pq.pack_codes(codes, 2).tolist() == [[0b00111001, 0b00000001]]


# hand-computed examples of the documented layout
HAND = [
    # 2-bit: code k at bits 2k..2k+1 of byte k//4
    (2, [[1, 2, 3, 0, 1]], [[0b00111001, 0b00000001]]),
    (2, [[3, 3, 3, 3]], [[0xFF]]),
    # ternary, trits5: [2, 0, 1] is v = 2*81 + 0*27 + 1*9 = 171 -> ceil(256 * 171 / 243) = 181;
    # K = 6: two bytes, codes 0, 2, 4 in byte 0 (v = 0*81 + 2*27 + 2*9 = 72 -> 76) and 1, 3, 5 in
    # byte 1 (v = 81 + 27 = 108 -> 114); five 2s: v = 242 -> 255; five 0s -> 0
    (1.58, [[2, 0, 1]], [[181]]),
    (1.58, [[0, 1, 2, 1, 2, 0]], [[76, 114]]),
    (1.58, [[2, 2, 2, 2, 2], [0, 0, 0, 0, 0]], [[255], [0]]),
    (1.58, [[1] * 20], [[-(-256 * 121 // 243)] * 4]),
    # 1-bit, least significant bit first
    (1, [[1, 0, 1, 1, 0, 0, 0, 0, 1]], [[0b00001101, 0b00000001]]),
    (1, [[0, 0, 0, 0, 0, 0, 0, 1]], [[0b10000000]]),
    (1, [[1]], [[0b00000001]]),
    # 4-bit, low nibble first
    (4, [[0x3, 0xA, 0xF]], [[0xA3, 0x0F]]),
    (4, [[0x1, 0x2], [0xE, 0x0]], [[0x21], [0x0E]]),
    # 3-bit: 8 codes in 3 little-endian bytes; codes 2 and 5 straddle bytes
    (3, [[1, 2, 3, 4, 5, 6, 7, 0]], [[0b11010001, 0b01011000, 0b00011111]]),
    (3, [[0, 0, 7, 0, 0, 7, 0, 0]], [[0b11000000, 0b10000001, 0b00000011]]),
    (3, [[0, 0, 4, 0, 0, 1, 0, 0]], [[0b00000000, 0b10000001, 0b00000000]]),
    (3, [[7, 1, 2]], [[0b10001111, 0b00000000]]),
    (3, [[0, 0, 0, 0, 0, 0, 0, 0, 5]], [[0, 0, 0, 0b00000101]]),
]


@pytest.mark.parametrize("bits,codes,expected", HAND, ids=[f"{h[0]}-{i}" for i, h in enumerate(HAND)])
def test_hand_computed_bytes(bits, codes, expected):
    c = torch.tensor(codes, dtype=torch.uint8)
    packed = pq.pack_codes(c, bits)
    assert packed.tolist() == expected
    assert pq.unpack_codes(torch.tensor(expected, dtype=torch.uint8), len(codes[0]), bits).tolist() \
        == codes


def test_layout_name():
    assert pq.LAYOUT == "paretoq-rowbits-v1+trits5-v1"
    assert pq.packing.LEGACY_LAYOUTS == ("paretoq-rowbits-v1",)


# --------------------------------------------------------------------------------------------
# pack/unpack errors


@pytest.mark.parametrize("bits,bad", [(1, 2), (2, 4), (3, 8), (4, 16), (4, 255), (1, 255)],
                         ids=_id)
def test_pack_rejects_codes_out_of_range(bits, bad):
    codes = torch.zeros(2, 5, dtype=torch.uint8)
    codes[1, 3] = bad
    with pytest.raises(ValueError, match=rf"in \[0, {2 ** CODE_BITS[bits]}\)"):
        pq.pack_codes(codes, bits)


@pytest.mark.parametrize("bits", [2, 3], ids=_id)
def test_pack_rejects_negative_codes(bits):
    codes = torch.tensor([[-1, 2, 1]], dtype=torch.int64)
    with pytest.raises(ValueError):
        pq.pack_codes(codes, bits)


def test_pack_rejects_ternary_code_3():
    codes = torch.tensor([[0, 3, 1]], dtype=torch.uint8)
    with pytest.raises(ValueError):
        pq.pack_codes(codes, 1.58)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)], ids=_id)
def test_pack_rejects_non_2d(shape):
    with pytest.raises(ValueError, match="2-D"):
        pq.pack_codes(torch.zeros(shape, dtype=torch.uint8), 2)


@pytest.mark.parametrize("bits", BITS, ids=_id)
@pytest.mark.parametrize("delta", [-1, 1])
def test_unpack_rejects_wrong_width(bits, delta):
    k = 13
    width = ref_row_bytes(k, bits)
    packed = torch.zeros(3, width + delta, dtype=torch.uint8)
    with pytest.raises(ValueError, match=rf"\(3, {width + delta}\).*in_features={k}.*\[N, {width}\]"):
        pq.unpack_codes(packed, k, bits)


@pytest.mark.parametrize("bad", [5, 0, 2.5, "abc"], ids=_id)
def test_pack_unpack_reject_bad_bits(bad):
    with pytest.raises(ValueError, match=r"allowed values are 1, 1\.58, 2, 3, 4"):
        pq.pack_codes(torch.zeros(2, 4, dtype=torch.uint8), bad)
    with pytest.raises(ValueError, match=r"allowed values are 1, 1\.58, 2, 3, 4"):
        pq.unpack_codes(torch.zeros(2, 1, dtype=torch.uint8), 4, bad)


# --------------------------------------------------------------------------------------------
# paretoq::linear vs a plain-PyTorch oracle


def oracle_weight(codes, scale, bits):
    """float64 [N, K] weight from the level table: level[code] * alpha of the code's group."""
    n, k = codes.shape
    groups = scale.shape[1]
    table = torch.tensor(LEVELS[bits], dtype=torch.float64)
    alpha = scale.double().repeat_interleave(k // groups, dim=1)
    return table[codes.long()] * alpha


def make_case(bits, n, k, groups, scale_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, len(LEVELS[bits]), (n, k), generator=gen)
    packed = ref_pack_bits(codes, bits)
    scale = (torch.rand(n, groups, generator=gen) * 1.5 + 0.05).to(scale_dtype)
    return codes, packed, scale


def assert_matmul_close(y, expected, bound, low_precision):
    eps = 2.0**-7 if low_precision else 1e-5
    err = (y.double() - expected).abs()
    tol = eps * bound + 1e-6
    assert bool((err <= tol).all()), f"max err {err.max().item()} vs tol {tol.min().item()}"


X_SHAPES = {"1d": (), "2d": (3,), "3d": (2, 5)}
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("xdt,sdt", DTYPE_PAIRS, ids=lambda p: _id(p))
@pytest.mark.parametrize("bits", BITS, ids=_id)
@pytest.mark.parametrize("xshape", list(X_SHAPES), ids=str)
@pytest.mark.parametrize("n,k,groups", [(3, 13, 1), (7, 5, 1), (1, 33, 1), (5, 24, 3), (2, 15, 5)],
                         ids=["3x13", "7x5", "1x33", "5x24g8", "2x15g3"])
def test_linear_vs_oracle(bits, xshape, n, k, groups, xdt, sdt):
    codes, packed, scale = make_case(bits, n, k, groups, sdt, seed=n * 100 + k)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(*X_SHAPES[xshape], k, generator=gen).to(xdt)
    w = oracle_weight(codes, scale, bits)
    expected = x.double() @ w.T
    bound = x.double().abs() @ w.abs().T
    low = xdt == torch.bfloat16 or sdt == torch.bfloat16
    for fn in (pq.linear, torch.ops.paretoq.linear):
        y = fn(x, packed, scale, float(bits))
        assert y.dtype == xdt
        assert y.shape == (*X_SHAPES[xshape], n)
        assert_matmul_close(y, expected, bound, low)


@pytest.mark.parametrize("bits", BITS, ids=_id)
@pytest.mark.parametrize("groups", [1, 4])
def test_linear_backward_vs_oracle(bits, groups):
    n, k = 6, 20
    codes, packed, scale = make_case(bits, n, k, groups, torch.float32, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, k, generator=gen, requires_grad=True)
    gy = torch.randn(2, 3, n, generator=gen)
    y = torch.ops.paretoq.linear(x, packed, scale, float(bits))
    y.backward(gy)
    w = oracle_weight(codes, scale, bits)
    torch.testing.assert_close(x.grad.double(), gy.double() @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", BITS, ids=_id)
@pytest.mark.parametrize("group_size", [None, 8])
def test_quantize_pack_linear_matches_reference_fake_quant(bits, group_size):
    # end to end: codes from quantize_codes, packed, through the op == x @ reference_fq(W).T
    gen = torch.Generator().manual_seed(21)
    n, k = 4, 24
    w = torch.randn(n, k, generator=gen)
    scale = pq.init_scale(w, bits, group_size) * 0.9
    packed = pq.pack_codes(pq.quantize_codes(w, scale, bits), bits)
    fn, nb = {1: (LsqBinaryTernaryExtension, 1), 1.58: (StretchedElasticQuant, 0),
              2: (StretchedElasticQuant, 2), 3: (LsqBinaryTernaryExtension, 3),
              4: (LsqBinaryTernaryExtension, 4)}[bits]
    groups = scale.shape[1]
    wq = fn.apply(w.reshape(n * groups, -1), scale.reshape(-1, 1), nb, False).reshape(n, k)
    x = torch.randn(3, k, generator=gen)
    y = pq.linear(x, packed, scale, float(bits))
    torch.testing.assert_close(y.double(), x.double() @ wq.double().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,groups,xshape", [(2, 1, (3, 13)), (1.58, 1, (2, 2, 13)),
                                                (3, 1, (13,)), (4, 13, (2, 13)), (1, 1, (1, 13))],
                         ids=["2", "1.58", "3-1d", "4-g1", "1"])
def test_opcheck(bits, groups, xshape):
    codes, packed, scale = make_case(bits, 5, 13, groups, torch.float32, seed=1)
    x = torch.randn(xshape, requires_grad=True)
    torch.library.opcheck(torch.ops.paretoq.linear.default, (x, packed, scale, float(bits)))


def test_opcheck_bf16():
    codes, packed, scale = make_case(2, 4, 9, 1, torch.bfloat16, seed=2)
    x = torch.randn(3, 9, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.paretoq.linear.default, (x, packed, scale, 2.0))


# --------------------------------------------------------------------------------------------
# op errors: messages name the shapes / dtypes involved

ERRORS = (TypeError, ValueError, RuntimeError)


@pytest.mark.parametrize("fn", [pq.linear, torch.ops.paretoq.linear], ids=["pq", "torch.ops"])
@pytest.mark.parametrize("bits,k_packed,k_x", [(2, 5, 9), (4, 13, 12), (3, 8, 16), (1, 8, 16),
                                               (1.58, 7, 3)], ids=_id)
def test_linear_k_mismatch(fn, bits, k_packed, k_x):
    _, packed, scale = make_case(bits, 3, k_packed, 1, torch.float32, seed=0)
    x = torch.randn(2, k_x)
    with pytest.raises(ERRORS, match=rf"K={k_x}") as ei:
        fn(x, packed, scale, float(bits))
    assert str(tuple(packed.shape)) in str(ei.value)


def test_linear_k_mismatch_same_byte_count():
    # The raw op has no K argument: it takes K from x, so a caller who packs for K=5 at 1 bit
    # (1 byte per row) and passes K=6..8 is not detectable from the bytes (documented in ops.py).
    # The packed weight subclass knows its K and rejects the mismatch before calling the op.
    from paretoq_ao import ParetoQPackedTensor
    w, packed, scale = make_case(1, 3, 5, 1, torch.float32, seed=0)
    weight = ParetoQPackedTensor(packed, scale, 1, torch.Size([3, 5]))
    with pytest.raises(ValueError, match=r"in_features=5"):
        torch.nn.functional.linear(torch.randn(2, 6), weight)


@pytest.mark.parametrize("fn", [pq.linear, torch.ops.paretoq.linear], ids=["pq", "torch.ops"])
@pytest.mark.parametrize("pdtype", [torch.int8, torch.int32, torch.float32], ids=_id)
def test_linear_non_uint8_packed(fn, pdtype):
    _, packed, scale = make_case(2, 3, 8, 1, torch.float32, seed=0)
    with pytest.raises(ERRORS, match=re.escape(str(pdtype))):
        fn(torch.randn(2, 8), packed.to(pdtype), scale, 2.0)


@pytest.mark.parametrize("fn", [pq.linear, torch.ops.paretoq.linear], ids=["pq", "torch.ops"])
def test_linear_non_2d_packed(fn):
    _, packed, scale = make_case(2, 3, 8, 1, torch.float32, seed=0)
    with pytest.raises(ERRORS, match=re.escape("(6,)")):
        fn(torch.randn(2, 8), packed.reshape(-1), scale, 2.0)


@pytest.mark.parametrize("fn", [pq.linear, torch.ops.paretoq.linear], ids=["pq", "torch.ops"])
@pytest.mark.parametrize("scale_shape", [(4, 1), (2, 1), (3, 3), (3,)], ids=_id)
def test_linear_scale_mismatch(fn, scale_shape):
    _, packed, _ = make_case(3, 3, 8, 1, torch.float32, seed=0)
    with pytest.raises(ERRORS, match=re.escape(str(tuple(scale_shape)))):
        fn(torch.randn(2, 8), packed, torch.ones(scale_shape), 3.0)


@pytest.mark.parametrize("fn", [pq.linear, torch.ops.paretoq.linear], ids=["pq", "torch.ops"])
@pytest.mark.parametrize("xdtype", [torch.int32, torch.int64, torch.uint8, torch.bool], ids=_id)
def test_linear_integer_input(fn, xdtype):
    _, packed, scale = make_case(4, 3, 8, 1, torch.float32, seed=0)
    x = torch.ones(2, 8).to(xdtype)
    with pytest.raises(ERRORS, match=re.escape(str(xdtype))):
        fn(x, packed, scale, 4.0)


@pytest.mark.parametrize("bad", [5.0, 0.0, 2.5], ids=_id)
def test_linear_bad_bits(bad):
    _, packed, scale = make_case(2, 3, 8, 1, torch.float32, seed=0)
    with pytest.raises(ERRORS, match=r"allowed values are 1, 1\.58, 2, 3, 4"):
        torch.ops.paretoq.linear(torch.randn(2, 8), packed, scale, bad)


@pytest.mark.parametrize("scale", [torch.ones(3, 0), torch.ones(3, 1, dtype=torch.int32)], ids=["no-groups", "int"])
def test_linear_rejects_empty_or_integer_scale(scale):
    _, packed, _ = make_case(2, 3, 8, 1, torch.float32, seed=0)
    with pytest.raises((ValueError, TypeError), match=r"scale"):
        pq.linear(torch.randn(2, 8), packed, scale, 2.0)
