"""The blocked16 weight order (packing.block16): its definition, the ``_b16`` ops, and ExecuTorch
programs that store it (the default) against the row order and the eager model."""

import pytest
import torch
import torch.nn as nn
from torchao import quantize_

import paretoq_ao as pq
from paretoq_ao import ops
from paretoq_ao.packing import BLOCK_ROWS, block16, blocked16_row_bytes, pack_codes, packed_row_bytes, unblock16
from paretoq_ao.formats import get_format
from _pte_zoo import CASES as ZOO_CASES, K as ZOO_K, LAYERS_PER_CASE, case_id

ZOO_LAYERS = LAYERS_PER_CASE * len(ZOO_CASES)

BITS = (1, 1.58, 2, 3, 4)


def _weight(n, k, bits, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = get_format(bits)
    codes = torch.randint(0, fmt.n_codes, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, groups, generator=g) * 0.1 + 0.01
    return pack_codes(codes, bits), scale


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k,groups", [(1, 7, 1), (5, 64, 2), (16, 96, 3), (17, 130, 1), (33, 200, 8), (40, 1000, 5)])
def test_block16_follows_its_definition_and_unblock16_inverts_it(bits, n, k, groups):
    if k % groups:
        pytest.skip("groups must divide K")
    packed, scale = _weight(n, k, bits, groups)
    codes, scales = block16(packed, scale, bits, k)
    nb, rp, rb = -(-n // 16), blocked16_row_bytes(k, bits), packed_row_bytes(k, bits)
    assert rp % (48 if bits == 3 else 16) == 0 and rp - rb < (48 if bits == 3 else 16)
    assert codes.dtype == torch.uint8 and tuple(codes.shape) == (nb, rp // 4, 64)
    assert scales.dtype == torch.float32 and tuple(scales.shape) == (nb, groups, 16)
    # byte b of row r at [r // 16, b // 4, 4 (r % 16) + b % 4]; every other byte is padding (0)
    seen = torch.zeros_like(codes, dtype=torch.bool)
    for r in range(n):
        for b in range(rb):
            assert codes[r // 16, b // 4, 4 * (r % 16) + b % 4] == packed[r, b]
            seen[r // 16, b // 4, 4 * (r % 16) + b % 4] = True
        for gi in range(groups):
            assert scales[r // 16, gi, r % 16] == scale[r, gi]
    assert not codes[~seen].any()
    if n % 16:  # the last block's padding rows
        assert not scales[-1, :, n % 16:].any()
    back, back_scale = unblock16(codes, scales, bits, n, k)
    assert torch.equal(back, packed) and torch.equal(back_scale, scale)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("groups", [1, 4])
def test_b16_ops_equal_the_row_order_ops(bits, groups):
    n, k = 37, 160
    packed, scale = _weight(n, k, bits, groups, seed=1)
    codes, scales = block16(packed, scale, bits, k)
    x = torch.randn(3, 2, k)
    assert torch.equal(ops.linear_b16(x, codes, scales, float(bits), n), ops.linear(x, packed, scale, float(bits)))
    assert torch.equal(ops.linear_8da_b16(x, codes, scales, float(bits), n),
                       ops.linear_8da(x, packed, scale, float(bits)))


def test_bad_blocked16_input_is_a_clear_error():
    packed, scale = _weight(20, 64, 2, 1)
    codes, scales = block16(packed, scale, 2, 64)
    with pytest.raises(ValueError, match=r"must be uint8 \[2, 4, 64\], got torch.uint8 \(2, 5, 64\)"):
        unblock16(torch.zeros(2, 5, 64, dtype=torch.uint8), scales, 2, 20, 64)
    with pytest.raises(ValueError, match=r"scales must be \[2, G, 16\]"):
        unblock16(codes, scales[:1], 2, 20, 64)
    with pytest.raises(ValueError, match=r"must be uint8 \[1, 4, 64\]"):  # out_features of another block count
        ops.linear_b16(torch.randn(1, 64), codes, scales, 2.0, 16)
    with pytest.raises(TypeError, match="block16: packed must be uint8"):
        block16(packed.to(torch.int16), scale, 2, 64)
    with pytest.raises(ValueError, match=r"shape \(20, 16\) do not fit in_features=129 of the 2-bit SEQ"):
        block16(packed, scale, 2, 129)


def _model(bits, group_size, k=200, n=37):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(k, n), nn.ReLU(), nn.Linear(n, 19, bias=False)).eval()  # 19 rows: padded
    cfg = pq.ParetoQWeightOnlyConfig(bits=bits) if group_size is None else \
        pq.ParetoQWeightOnlyConfig(bits=bits, group_size=group_size)
    quantize_(m, cfg, filter_fn=lambda mod, f: isinstance(mod, nn.Linear))
    return m


@pytest.mark.parametrize("bits,layout", ZOO_CASES, ids=[case_id(b, g) for b, (g, _, _) in ZOO_CASES])
@pytest.mark.parametrize("act", ["int8", "float"])
def test_pte_in_blocked16_order_equals_row_order_and_eager(bits, layout, act, pte_zoo):
    """The same model exported in both weight orders (one shared program per order and activation
    mode holds every format x layout, tests/_pte_zoo.py): the programs call the ops of their order,
    record their activation mode, run every layer in the C++ kernels, and give the same outputs,
    equal to the eager model."""
    pe = pytest.importorskip("paretoq_ao.export")
    group_size = layout[0]
    m = pte_zoo.model
    x = torch.randn(5, ZOO_K)
    outs = {}
    for order in ("blocked16", "rows"):
        path = pte_zoo.path(act, order)
        data = open(path, "rb").read()
        b16_op = (b"paretoq::linear_8da_b16" if act == "int8" else b"paretoq::linear_b16") in data
        assert b16_op == (order == "blocked16")
        assert pe.program_activations(path) == act
        f = pe.load_executorch(path)
        before = pe.kernel_call_count(act)
        outs[order] = m.outputs(f(x), bits, group_size)
        assert pe.kernel_call_count(act) == before + ZOO_LAYERS  # every layer ran in the C++ kernels
    pq.set_activations(m, act)
    with torch.no_grad():
        ref = m.branch(bits, group_size)(x)
    for b16, rows, want in zip(outs["blocked16"], outs["rows"], ref):
        assert torch.equal(b16, rows)
        if act == "int8":
            assert torch.equal(b16, want)
        else:
            torch.testing.assert_close(b16, want, rtol=1e-5, atol=1e-5)


def test_unknown_weight_order_is_refused_before_export(tmp_path):
    pe = pytest.importorskip("paretoq_ao.export")
    m = _model(2, None)
    with pytest.raises(ValueError, match="weight_order must be 'blocked16' or 'rows', got 'cols'"):
        pe.export_executorch(m, (torch.randn(1, 200),), tmp_path / "x.pte", weight_order="cols")
    assert not (tmp_path / "x.pte").exists()


def test_block_rows_is_the_kernels_block():
    # the C++ kernels' kBlockRows (paretoq_kernels.h) is the same 16
    from paretoq_ao.export._build import source_dir
    header = (source_dir() / "csrc" / "paretoq_kernels.h").read_text()
    assert f"constexpr int kBlockRows = {BLOCK_ROWS};" in header
