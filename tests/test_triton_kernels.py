"""Triton kernels of ``paretoq::linear`` (paretoq_ao.triton_kernels) under the Triton interpreter.

Every bit width x {per-row, group} scales x {M = 1 (GEMV), small M, M > 64 (tl.dot tiles)} x
{fp32, fp16} against ``paretoq_ao.ops.reference_linear``, odd N and K (K not a multiple of 8),
forced configs (split-K on/off, per-element group scales, GEMV for M > 1), the layout written by
the torchao converter, strided inputs, edge shapes, the tuner's pruning, and input validation.
"""

import os

# The kernels are defined as interpreter functions only if this is set when they are imported;
# it is restored below so that the other test modules keep the op's reference path.
_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import paretoq_ao as pq  # noqa: E402
from paretoq_ao.ops import reference_linear  # noqa: E402

if "paretoq_ao.triton_kernels.linear" in sys.modules:  # imported earlier without the interpreter?
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(sys.modules["paretoq_ao.triton_kernels.linear"]._gemm_kernel,
                      InterpretedFunction):
        pytest.skip("paretoq_ao.triton_kernels was imported before TRITON_INTERPRET=1 was set; "
                    "run this file on its own", allow_module_level=True)

from paretoq_ao.triton_kernels import (  # noqa: E402
    KernelConfig, clear_cache, model_shapes, supports, triton_linear, tuned_configs, warmup,
)
from paretoq_ao.triton_kernels import tuning  # noqa: E402
from paretoq_ao.triton_kernels.linear import (  # noqa: E402
    GEMV_MAX_M, Problem, scale_mode, split_plan,
)

if _PREVIOUS_INTERPRET is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """Each test here runs with TRITON_INTERPRET=1: paretoq::linear on CPU uses the kernels."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

BITS = [1, 1.58, 2, 3, 4]


def make_weight(N, K, bits, group_size=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    scale = pq.init_scale(w, bits, group_size)
    packed = pq.pack_codes(pq.quantize_codes(w, scale, bits), bits)
    return packed, scale.to(dtype)


def make_x(shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def assert_close(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    out, ref = out.double(), ref.double()
    mag = ref.abs().max().item() + 1e-12
    err = (out - ref).abs().max().item()
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    assert err <= tol * mag, f"max abs err {err:.3g} > {tol} * max|ref| ({mag:.3g})"


# ---------------------------------------------------------------------------------------------
# The main matrix
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M", [1, 3, 70])
@pytest.mark.parametrize("group_size", [None, 32], ids=["row", "g32"])
@pytest.mark.parametrize("bits", BITS)
def test_matches_reference(bits, group_size, M, dtype):
    N, K = 33, (160 if group_size else 45)  # odd N; per-row K not a multiple of 8
    packed, scale = make_weight(N, K, bits, group_size, dtype)
    x = make_x((M, K), dtype)
    out = triton_linear(x, packed, scale, bits)
    assert_close(out, reference_linear(x, packed, scale, bits), dtype)


# Forced configs: split-K on/off, per-element group scales (group 24 < BLOCK_K 32), the GEMV
# kernel serving M > 1, the small-M tl.dot kernel with several splits, grouped ordering.
FORCED = [
    ("gemv_nosplit", 1, dict(kind="gemv", block_n=16, block_k=32, split_k=1)),
    ("gemv_split3", 1, dict(kind="gemv", block_n=32, block_k=16, split_k=3)),
    ("gemv_M3", 3, dict(kind="gemv", block_n=16, block_k=64, split_k=2)),
    ("small_nosplit", 5, dict(kind="gemm", block_m=16, block_n=32, block_k=32, split_k=1)),
    ("small_split4", 17, dict(kind="gemm", block_m=16, block_n=16, block_k=16, split_k=4)),
    ("large_bk64", 70, dict(kind="gemm", block_m=16, block_n=16, block_k=64, group_m=3)),
]


@pytest.mark.parametrize("group_size", [None, 24, 48], ids=["row", "g24", "g48"])
@pytest.mark.parametrize("name,M,cfg", FORCED, ids=[f[0] for f in FORCED])
@pytest.mark.parametrize("bits", [1.58, 3])
def test_forced_configs(bits, name, M, cfg, group_size):
    N, K = 19, 96
    packed, scale = make_weight(N, K, bits, group_size)
    x = make_x((M, K))
    out = triton_linear(x, packed, scale, bits, config=cfg)
    assert_close(out, reference_linear(x, packed, scale, bits), torch.float32)


# The word GEMV (kind "gemvw"): 1/2/4-bit codes read as int32 words. K = 160 is a whole number
# of words at every width but not of 64-column tiles (the masked tail tile); K = 256 takes the
# unmasked path. M = 3 runs three program rows; split-K 3 makes uneven splits.
WORDS_CASES = [
    ("even_nosplit", 1, 256, dict(kind="gemvw", block_n=16, block_k=64, split_k=1)),
    ("even_split3", 1, 256, dict(kind="gemvw", block_n=32, block_k=32, split_k=3)),
    ("tail_split2", 1, 160, dict(kind="gemvw", block_n=16, block_k=64, split_k=2)),
    ("tail_M3", 3, 160, dict(kind="gemvw", block_n=64, block_k=128, split_k=1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("group_size", [None, 32], ids=["row", "g32"])
@pytest.mark.parametrize("name,M,K,cfg", WORDS_CASES, ids=[c[0] for c in WORDS_CASES])
@pytest.mark.parametrize("bits", BITS)
def test_word_gemv(bits, name, M, K, cfg, group_size, dtype):
    if group_size and group_size % cfg["block_k"]:
        cfg = dict(cfg, block_k=32)  # the word GEMV needs groups that hold whole K tiles
    N = 37
    packed, scale = make_weight(N, K, bits, group_size, dtype, seed=K + M)
    x = make_x((M, K), dtype) * 3
    out = triton_linear(x, packed, scale, bits, config=cfg)
    assert_close(out, reference_linear(x, packed, scale, bits), dtype)


def test_word_gemv_every_code_value():
    # All codes at every position of a unit (both 16-bit halves; the five 3-bit windows and the
    # codes straddling words), x = one-hot rows.
    for bits in BITS:
        fmt = pq.get_format(bits)
        K = 32 * fmt.n_codes  # a whole number of words at every width
        codes = (torch.arange(3 * K).reshape(3, K) % fmt.n_codes).to(torch.uint8)
        codes[1] = codes[1].flip(0)
        packed = pq.pack_codes(codes, bits)
        scale = torch.tensor([[1.0], [0.5], [2.0]])
        want = pq.dequantize_codes(codes, scale, bits)
        for k in (0, 6, 7, 8, 10, 13, 14, 15, 16, 20, 21, 27, 28, 31, K - 1):
            x = torch.zeros(1, K)
            x[0, k] = 1.0
            out = triton_linear(x, packed, scale, bits,
                                config=dict(kind="gemvw", block_n=16, block_k=32))
            assert torch.equal(out[0], want[:, k]), (bits, k)


def test_word_gemv_eligibility():
    from paretoq_ao.triton_kernels.linear import word_kernel_ok, words_view

    packed, scale = make_weight(9, 64, 2)  # 16-byte rows
    assert words_view(packed) is not None and words_view(packed).shape == (9, 4)
    assert words_view(packed[:, 1:]) is None  # data pointer and row bytes off by one
    wide = torch.zeros(9, 18, dtype=torch.uint8)
    assert words_view(wide[:, :16]) is None  # row stride 18 is not a multiple of 4
    wide = torch.zeros(9, 20, dtype=torch.uint8)
    assert words_view(wide[:, :16]) is not None  # row stride 20 is
    assert words_view(make_weight(9, 60, 2)[0]) is None  # 15-byte rows
    cfg = KernelConfig("gemvw", block_n=16, block_k=64)
    base = dict(M=1, N=4096, K=4096, bits=2, code_bits=2, groups=1, x_dtype=torch.float16,
                out_dtype=torch.float16, dot_precision=None, device="x", word_aligned=True)
    assert word_kernel_ok(Problem(**base), cfg)
    assert word_kernel_ok(Problem(**dict(base, bits=3, code_bits=3)), cfg)  # 32-code units
    assert not word_kernel_ok(Problem(**dict(base, word_aligned=False)), cfg)
    assert not word_kernel_ok(Problem(**dict(base, M=GEMV_MAX_M + 1)), cfg)
    assert not word_kernel_ok(Problem(**dict(base, groups=128)), cfg)  # groups of 32 < tile 64
    assert word_kernel_ok(Problem(**dict(base, groups=64)), cfg)  # groups of 64
    with pytest.raises(ValueError, match="block_k >= 32"):
        KernelConfig("gemvw", block_n=16, block_k=16).check()
    # A forced word config where it cannot serve: a clear error naming the problem.
    p3, s3 = make_weight(9, 40, 3)  # 15-byte rows
    with pytest.raises(ValueError, match=r"cannot serve.*bits=3"):
        triton_linear(torch.randn(1, 40), p3, s3, 3, config=cfg)
    p2, s2 = make_weight(9, 60, 2)
    with pytest.raises(ValueError, match=r"cannot serve.*packed \(9, 15\)"):
        triton_linear(torch.randn(1, 60), p2, s2, 2, config=cfg)


# The word GEMM (kind "gemmw"): tl.dot tiles decoded from int32 words. Group 24 (g24) does not
# hold whole 32-column tiles: per-element scales (scale mode 2) on the word path.
GEMMW_CASES = [
    ("M2_split3", 2, 256, dict(kind="gemmw", block_m=16, block_n=16, block_k=32, split_k=3)),
    ("M17_tail", 17, 160, dict(kind="gemmw", block_m=16, block_n=32, block_k=64, split_k=1)),
    ("M70_tail_split2", 70, 160, dict(kind="gemmw", block_m=32, block_n=16, block_k=32,
                                      split_k=2, group_m=2)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("group_size", [None, 32, 24], ids=["row", "g32", "g24"])
@pytest.mark.parametrize("name,M,K,cfg", GEMMW_CASES, ids=[c[0] for c in GEMMW_CASES])
@pytest.mark.parametrize("bits", BITS)
def test_word_gemm(bits, name, M, K, cfg, group_size, dtype):
    if group_size == 24:
        K = 192  # 24 divides K; 192 is a whole number of words at every width
    N = 37
    packed, scale = make_weight(N, K, bits, group_size, dtype, seed=K + M)
    x = make_x((M, K), dtype)
    out = triton_linear(x, packed, scale, bits, config=cfg)
    assert_close(out, reference_linear(x, packed, scale, bits), dtype)


def test_word_gemm_every_code_value():
    for bits in BITS:
        fmt = pq.get_format(bits)
        K = 32 * fmt.n_codes
        codes = (torch.arange(3 * K).reshape(3, K) % fmt.n_codes).to(torch.uint8)
        codes[1] = codes[1].flip(0)
        packed = pq.pack_codes(codes, bits)
        scale = torch.tensor([[1.0], [0.5], [2.0]])
        # one-hot rows for every position of the first unit and the last columns
        cols = torch.tensor(list(range(32)) + list(range(K - 8, K)))
        out = triton_linear(torch.eye(K)[cols], packed, scale, bits,
                            config=dict(kind="gemmw", block_m=16, block_n=16, block_k=32))
        assert torch.equal(out, pq.dequantize_codes(codes, scale, bits).t()[cols]), bits


def test_word_gemm_refuses_what_it_cannot_serve():
    cfg = dict(kind="gemmw", block_m=16, block_n=16, block_k=32)
    p3, s3 = make_weight(9, 40, 3)  # 15-byte rows
    with pytest.raises(ValueError, match=r"word GEMM.*bits=3"):
        triton_linear(torch.randn(4, 40), p3, s3, 3, config=cfg)
    p2, s2 = make_weight(9, 60, 2)  # 15-byte rows
    with pytest.raises(ValueError, match=r"word GEMM.*packed \(9, 15\)"):
        triton_linear(torch.randn(4, 60), p2, s2, 2, config=cfg)
    with pytest.raises(ValueError, match="block_k >= 32"):
        KernelConfig("gemmw", block_m=16, block_n=16, block_k=16).check()


def test_scale_modes_are_exercised():
    p = Problem(M=1, N=8, K=96, bits=2, code_bits=2, groups=4, x_dtype=torch.float32,
                out_dtype=torch.float32, dot_precision=None, device="cpu")
    assert scale_mode(p, KernelConfig("gemv", block_n=16, block_k=32)) == 2  # 24 % 32
    assert scale_mode(p, KernelConfig("gemv", block_n=16, block_k=8)) == 1
    assert split_plan(96, 32, 3) == (3, 32)
    assert split_plan(96, 32, 8) == (3, 32)  # never more splits than K tiles
    assert split_plan(100, 16, 4) == (4, 32)  # 7 tiles -> 2 per split, 4 splits


@pytest.mark.parametrize("bits", BITS)
def test_bf16_and_out_dtype(bits):
    packed, scale = make_weight(17, 64, bits, 16, torch.bfloat16)
    x = make_x((2, 64), torch.bfloat16)
    out = triton_linear(x, packed, scale, bits)
    assert_close(out, reference_linear(x, packed, scale, bits), torch.bfloat16)
    x16 = make_x((1, 64), torch.float16)
    out32 = triton_linear(x16, packed, scale, bits, out_dtype=torch.float32)
    assert out32.dtype == torch.float32
    ref = reference_linear(x16.float(), packed, scale, bits)
    assert_close(out32, ref, torch.float16)


# ---------------------------------------------------------------------------------------------
# The layout the converter writes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 32], ids=["row", "g32"])
@pytest.mark.parametrize("bits", BITS)
def test_converter_layout(bits, group_size):
    from torchao import quantize_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 37, bias=True))
    quantize_(model, pq.ParetoQWeightOnlyConfig(bits=bits, group_size=group_size))
    w = model[0].weight
    assert isinstance(w, pq.ParetoQPackedTensor)
    x = torch.randn(2, 3, 96)
    with torch.no_grad():
        expected = model(x)
        out = triton_linear(x, w.qdata, w.scale, w.bits) + model[0].bias
    assert_close(out, expected, torch.float32)


# ---------------------------------------------------------------------------------------------
# Strides and edge shapes
# ---------------------------------------------------------------------------------------------


def test_leading_dims_and_strided_inputs():
    bits, N, K = 3, 21, 40
    packed, scale = make_weight(N, K, bits, 8)
    ref_x = make_x((2, 3, K))
    ref = reference_linear(ref_x, packed, scale, bits)
    assert triton_linear(ref_x, packed, scale, bits).shape == (2, 3, N)
    assert_close(triton_linear(ref_x, packed, scale, bits), ref, torch.float32)
    # x with a row stride (a column slice of a wider tensor): no copy needed
    wide = torch.zeros(2, 3, K + 7)
    wide[..., :K] = ref_x
    assert_close(triton_linear(wide[..., :K], packed, scale, bits), ref, torch.float32)
    # x whose last dimension is not unit-stride: copied once
    xt = ref_x.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert xt.stride(-1) != 1
    assert_close(triton_linear(xt, packed, scale, bits), ref, torch.float32)
    # packed rows with a stride (view into a wider buffer) and a non-contiguous scale
    pw = torch.zeros(N, packed.shape[1] + 5, dtype=torch.uint8)
    pw[:, : packed.shape[1]] = packed
    st = scale.t().contiguous().t()
    assert not st.is_contiguous()
    assert_close(triton_linear(ref_x, pw[:, : packed.shape[1]], st, bits), ref, torch.float32)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (2, 5, 8), (1, 16, 9), (65, 3, 17)])
def test_edge_shapes(bits, M, N, K):
    packed, scale = make_weight(N, K, bits)
    x = make_x((M, K))
    assert_close(triton_linear(x, packed, scale, bits), reference_linear(x, packed, scale, bits),
                 torch.float32)


def test_empty_and_tiny_scales():
    packed, scale = make_weight(6, 16, 2)
    assert triton_linear(torch.randn(0, 16), packed, scale, 2).shape == (0, 6)
    assert triton_linear(torch.randn(4, 0, 16), packed, scale, 2).shape == (4, 0, 6)
    scale = scale.clone()
    scale[2] = 0.0  # clamped to SCALE_EPS like dequantize_codes
    scale[3] = -1.0
    x = make_x((3, 16))
    assert_close(triton_linear(x, packed, scale, 2), reference_linear(x, packed, scale, 2),
                 torch.float32)


def test_every_code_value_decodes():
    # All codes of each width at every bit offset (3-bit codes straddling bytes included).
    for bits in BITS:
        fmt = pq.get_format(bits)
        K = 8 * fmt.n_codes + 3
        codes = (torch.arange(4 * K).reshape(4, K) % fmt.n_codes).to(torch.uint8)
        packed = pq.pack_codes(codes, bits)
        scale = torch.ones(4, 1)
        eye = torch.eye(K)  # x = I: the output is the dequantized weight, transposed
        out = triton_linear(eye, packed, scale, bits)
        want = pq.dequantize_codes(codes, scale, bits).t()
        assert torch.equal(out, want), bits


# ---------------------------------------------------------------------------------------------
# Tuning, warmup
# ---------------------------------------------------------------------------------------------


def gpu_problem(M, N, K, groups=1, code_bits=2, dtype=torch.float16):
    return Problem(M=M, N=N, K=K, bits=2, code_bits=code_bits, groups=groups, x_dtype=dtype,
                   out_dtype=dtype, dot_precision=None, device="NVIDIA H100", num_sms=132,
                   smem_bytes=232448)


def test_pruner_on_gpu_shapes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # pretend: full candidate sets
    for M, N, K, groups in [(1, 4096, 4096, 1), (4, 4096, 14336, 112), (64, 33, 45, 1),
                            (256, 28672, 8192, 64), (1, 16, 24, 3), (70, 8, 8, 1),
                            (1, 4096, 4096, 128), (16, 4096, 4096, 256), (256, 4096, 4096, 128)]:
        p = gpu_problem(M, N, K, groups)
        cands = tuning.candidate_configs(p)
        kept = tuning.prune(cands, p)
        assert kept, (M, N, K)
        for c in kept:
            if c.kind == "gemm":
                assert min(c.block_m, c.block_n, c.block_k) >= 16
            if c.split_k > 1:
                assert c.split_k <= -(-K // c.block_k)
            if groups > 1 and any(scale_mode(p, c2) == 1 for c2 in cands):
                assert scale_mode(p, c) == 1
            assert tuning._smem_estimate(p, c) <= p.smem_bytes
        if groups > 1 and (K // groups) % 16 == 0:  # groups of 16, 32, ...: per-tile scales
            assert all(scale_mode(p, c) == 1 for c in kept), (M, N, K, groups)
        d = tuning.default_config(p)
        d.check()
        assert d.kind == ("gemv" if M == 1 else "gemm")
    # the word GEMV: a candidate (and the default) for M = 1 on word-aligned 1/2/4-bit rows only
    for M, groups, bits, code_bits, aligned, want in [
            (1, 1, 2, 2, True, True), (1, 32, 1.58, 2, True, True), (4, 1, 4, 4, True, True),
            (1, 1, 3, 3, True, True), (1, 1, 2, 2, False, False), (1, 512, 2, 2, True, False),
            (16, 1, 2, 2, True, False)]:
        p = Problem(M=M, N=4096, K=4096, bits=bits, code_bits=code_bits, groups=groups,
                    x_dtype=torch.bfloat16, out_dtype=torch.bfloat16, dot_precision=None,
                    device="NVIDIA H100", num_sms=132, smem_bytes=232448, word_aligned=aligned)
        kept = tuning.prune(tuning.candidate_configs(p), p)
        assert any(c.kind == "gemvw" for c in kept) == want, (M, groups, bits, aligned)
        if M == 1:
            assert (tuning.default_config(p).kind == "gemvw") == want, (groups, bits, aligned)
        for c in kept:
            if c.kind == "gemvw":
                assert groups == 1 or (4096 // groups) % c.block_k == 0
    # the word GEMM: a twin of every tl.dot candidate with BLOCK_K >= 32, kept on word-aligned
    # 1/2/4-bit rows only, and the default there
    for M, bits, code_bits, aligned, want in [(16, 2, 2, True, True), (256, 4, 4, True, True),
                                              (16, 3, 3, True, True), (256, 2, 2, False, False)]:
        p = Problem(M=M, N=4096, K=4096, bits=bits, code_bits=code_bits, groups=1,
                    x_dtype=torch.bfloat16, out_dtype=torch.bfloat16, dot_precision=None,
                    device="NVIDIA H100", num_sms=132, smem_bytes=232448, word_aligned=aligned)
        cands = tuning.candidate_configs(p)
        twins = [c for c in cands if c.kind == "gemmw"]
        assert len(twins) == len([c for c in cands if c.kind == "gemm" and c.block_k >= 32])
        kept = tuning.prune(cands, p)
        assert any(c.kind == "gemmw" for c in kept) == want, (M, bits, aligned)
        assert any(c.kind == "gemm" for c in kept)  # the byte kernel stays a candidate
        assert (tuning.default_config(p).kind == "gemmw") == want, (M, bits, aligned)
    # large M: no split-K, tensor-core tiles only; M bucket in the key
    p = gpu_problem(300, 4096, 4096)
    assert all(c.kind in ("gemm", "gemmw") and c.split_k == 1
               for c in tuning.prune(tuning.candidate_configs(p), p))
    assert tuning.tuning_key(p)[:2] == ("large", 512)
    assert tuning.tuning_key(gpu_problem(3, 64, 64))[:2] == ("small", 4)
    assert tuning.tuning_key(gpu_problem(5000, 64, 64))[:2] == ("large", 1024)
    # deterministic algorithms: split-K configs are dropped
    torch.use_deterministic_algorithms(True)
    try:
        p = gpu_problem(1, 4096, 4096)
        assert all(c.split_k == 1 for c in tuning.prune(tuning.candidate_configs(p), p))
        assert tuning.default_config(p).split_k == 1
    finally:
        torch.use_deterministic_algorithms(False)


def test_interpreter_uses_one_config_and_warmup():
    clear_cache()
    p = gpu_problem(3, 64, 64)
    assert len(tuning.candidate_configs(p)) == 1
    got = warmup((1, 33, 45, 3), (3, 33, 96, 2, 32), (70, 16, 32, 4, None), dtype=torch.float32)
    assert set(got) == {(1, 33, 45, 3, None), (3, 33, 96, 2, 32), (70, 16, 32, 4, None)}
    assert all(isinstance(c, KernelConfig) for c in got.values())
    assert len(tuned_configs()) == 3
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    from torchao import quantize_

    quantize_(model, pq.ParetoQWeightOnlyConfig(bits=2, group_size=8))
    assert model_shapes(model, (1, 4)) == [(1, 16, 32, 2, 8), (4, 16, 32, 2, 8),
                                          (1, 8, 16, 2, 8), (4, 8, 16, 2, 8)]
    with pytest.raises(ValueError, match="group_size"):
        warmup((1, 16, 30, 2, 16))


def test_tuned_configs_round_trip_through_files(tmp_path, monkeypatch):
    import json

    from paretoq_ao.triton_kernels import load_configs, save_configs

    clear_cache()
    warmup((1, 33, 96, 2), (3, 33, 96, 3, 32), dtype=torch.float32)
    before = tuned_configs()
    assert len(before) == 2
    path = tmp_path / "cfg.json"
    assert save_configs(path) == 2
    doc = json.loads(path.read_text())
    assert doc["format"] == "paretoq-triton-configs-v1" and doc["devices"] == ["cpu"]
    assert set(doc["entries"][0]["key"]) == set(tuning.KEY_FIELDS)
    assert save_configs(tmp_path / "none.json", device="NVIDIA H100") == 0
    clear_cache()
    assert load_configs(path) == 2 and tuned_configs() == before
    assert load_configs(path) == 0  # already there
    assert load_configs(path, override=True) == 2

    # A file found through $PARETOQ_TRITON_CONFIGS is loaded before the first lookup and its
    # config is the one launched (here a non-default GEMV config for the M = 1 shape).
    forced = KernelConfig("gemv", block_n=32, block_k=16, split_k=3)
    key = next(k for k in before if k[0] == "gemv")
    doc["entries"] = [{"key": dict(zip(tuning.KEY_FIELDS, key)), "config": vars(forced)}]
    (tmp_path / "env.json").write_text(json.dumps(doc))
    clear_cache()
    monkeypatch.setenv("PARETOQ_TRITON_CONFIGS", str(tmp_path / "env.json"))
    packed, scale = make_weight(33, 96, 2)
    x = make_x((1, 96))
    out = triton_linear(x, packed, scale, 2)
    assert tuned_configs()[key] == forced
    assert_close(out, reference_linear(x, packed, scale, 2), torch.float32)

    # Malformed files: clear errors naming the file and the entry; nothing is added.
    clear_cache()
    monkeypatch.delenv("PARETOQ_TRITON_CONFIGS")
    bad = dict(doc, entries=doc["entries"] + [{"key": {"path": "gemv"}, "config": vars(forced)}])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad\.json: entry 1 is invalid.*key fields"):
        load_configs(tmp_path / "bad.json")
    bad = dict(doc, entries=[dict(doc["entries"][0], config=dict(vars(forced), block_n=24))])
    (tmp_path / "bad2.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"entry 0 is invalid.*powers of two"):
        load_configs(tmp_path / "bad2.json")
    (tmp_path / "bad3.json").write_text("{\"format\": \"other\"}")
    with pytest.raises(ValueError, match="expected format"):
        load_configs(tmp_path / "bad3.json")
    (tmp_path / "bad4.json").write_text("not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_configs(tmp_path / "bad4.json")
    assert tuned_configs() == {}
    clear_cache()


def test_shipped_configs_load_for_their_device_only(tmp_path, monkeypatch):
    import json

    from paretoq_ao.triton_kernels import save_configs

    clear_cache()
    warmup((1, 33, 96, 2), dtype=torch.float32)
    (key, _), = tuned_configs().items()
    save_configs(tmp_path / "src.json")
    doc = json.loads((tmp_path / "src.json").read_text())
    forced = KernelConfig("gemv", block_n=32, block_k=16, split_k=3)
    doc["entries"][0]["config"] = vars(forced)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "cpu.json").write_text(json.dumps(doc))  # lists the device "cpu"
    other = dict(doc, devices=["NVIDIA H100"], entries=[
        dict(doc["entries"][0], key=dict(doc["entries"][0]["key"], device="NVIDIA H100"))])
    (shipped / "h100.json").write_text(json.dumps(other))
    (shipped / "broken.json").write_text("{")
    monkeypatch.setattr(tuning, "SHIPPED_CONFIGS_DIR", str(shipped))
    monkeypatch.delenv("PARETOQ_TRITON_CONFIGS", raising=False)
    clear_cache()
    packed, scale = make_weight(33, 96, 2)
    x = make_x((1, 96))
    with pytest.warns(UserWarning, match="broken.json"):
        out = triton_linear(x, packed, scale, 2)
    assert tuned_configs() == {key: forced}  # the H100 file was not loaded
    assert_close(out, reference_linear(x, packed, scale, 2), torch.float32)
    clear_cache()


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def test_errors():
    packed, scale = make_weight(8, 32, 2)
    x = torch.randn(2, 32)
    with pytest.raises(TypeError, match="float64"):
        triton_linear(x.double(), packed, scale, 2)
    with pytest.raises(TypeError, match="int32"):
        triton_linear(x.to(torch.int32), packed, scale, 2)
    with pytest.raises(TypeError, match="scale of dtype float64"):
        triton_linear(x, packed, scale.double(), 2)
    with pytest.raises(TypeError, match="out_dtype"):
        triton_linear(x, packed, scale, 2, out_dtype=torch.float64)
    with pytest.raises(ValueError, match=r"K=40.*\(8, 8\)"):
        triton_linear(torch.randn(2, 40), packed, scale, 2)  # K mismatch names the shapes
    with pytest.raises(ValueError, match="bits"):
        triton_linear(x, packed, scale, 5)
    with pytest.raises(TypeError, match="uint8"):
        triton_linear(x, packed.to(torch.int16), scale, 2)
    with pytest.raises(ValueError, match="scale of shape"):
        triton_linear(x, packed, torch.ones(8, 3), 2)
    with pytest.raises(ValueError, match="scale of shape"):
        triton_linear(x, packed, torch.ones(8, 0), 2)
    with pytest.raises(ValueError, match="different devices"):
        triton_linear(x.to("meta"), packed, scale, 2)
    with pytest.raises(ValueError, match="on the CPU"):
        triton_linear(x.to("meta"), packed.to("meta"), scale.to("meta"), 2)
    with pytest.raises(ValueError, match="contiguous"):
        triton_linear(x, packed.t().contiguous().t(), scale, 2)
    with pytest.raises(ValueError, match="BLOCK_M/N/K >= 16"):
        triton_linear(x, packed, scale, 2, config=dict(kind="gemm", block_m=8, block_n=16, block_k=16))
    with pytest.raises(ValueError, match="powers of two"):
        triton_linear(x, packed, scale, 2, config=dict(kind="gemv", block_n=12, block_k=16))
    assert supports(x, packed, scale, 2)
    assert not supports(x.double(), packed, scale, 2)


def test_requires_cuda_without_interpreter(monkeypatch):
    packed, scale = make_weight(8, 32, 2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA device"):
        triton_linear(torch.randn(2, 32), packed, scale, 2)
    assert not supports(torch.randn(2, 32), packed, scale, 2)


# ---------------------------------------------------------------------------------------------
# GPU legality without a GPU
# ---------------------------------------------------------------------------------------------


def test_kernels_compile_for_sm90():
    """The interpreter accepts code the GPU compiler rejects (tl.dot < 16, layouts): compile a few
    kernels for sm_90 with Triton's bundled ptxas, in a subprocess without TRITON_INTERPRET."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-m", "paretoq_ao.triton_kernels.compile_check", "--quick"],
                       env=env, capture_output=True, text=True, timeout=900)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "13/13 kernels compiled" in r.stdout  # 11 rowbits + 2 trits5 (ternary)


# ---------------------------------------------------------------------------------------------
# The public path: paretoq::linear routes to the kernels (CUDA, or CPU under the interpreter)
# ---------------------------------------------------------------------------------------------


def _converted_linear(bits, group_size, k=64, n=48, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(k, n), nn.ReLU(), nn.Linear(n, 24, bias=False))
    from torchao import quantize_

    quantize_(m, pq.ParetoQWeightOnlyConfig(bits=bits, group_size=group_size))
    return m


@pytest.mark.parametrize("bits,group_size", [(2, None), (1.58, 16), (3, None), (4, 16), (1, None)])
def test_op_routes_to_kernels_under_interpreter(bits, group_size, kernel_calls, monkeypatch):
    m = _converted_linear(bits, group_size)
    x = make_x((5, 64))
    out = m(x)
    assert kernel_calls == [(5, 64), (5, 48)]
    monkeypatch.delenv("TRITON_INTERPRET")  # the reference path, as every other CPU test sees it
    ref = m(x)
    assert len(kernel_calls) == 2
    assert_close(out, ref, torch.float32)


def test_op_falls_back_to_reference_for_unsupported_dtype(kernel_calls):
    m = _converted_linear(2, None).double()
    x = make_x((3, 64)).double()
    out = m(x)
    assert kernel_calls == []  # fp64 is not a kernel dtype: the reference handles it
    w0, w1 = m[0].weight.dequantize(torch.float64), m[2].weight.dequantize(torch.float64)
    expected = torch.relu(x @ w0.T + m[0].bias.double()) @ w1.T
    torch.testing.assert_close(out, expected)


def test_compiled_model_runs_kernels_and_matches_eager(kernel_calls):
    torch._dynamo.reset()
    m = _converted_linear(2, 16)
    x = make_x((4, 64))
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True)(x)
    assert len(kernel_calls) == 4  # two layers, eager then compiled
    torch.testing.assert_close(compiled, eager)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Ternary in the trits5 layout (its own kernel, trits5.py)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M", [1, 17, 70])
@pytest.mark.parametrize("K,group_size", [(1, None), (5, None), (19, None), (21, None), (44, 4), (88, 8),
                                          (103, None), (160, 32), (200, 40)])
def test_trits5_every_row_tail_and_group(K, group_size, M, dtype):
    packed, scale = make_weight(37, K, 1.58, group_size, dtype, seed=K)
    assert packed.shape[1] == (K + 4) // 5
    x = make_x((M, K), dtype)
    assert_close(triton_linear(x, packed, scale, 1.58), reference_linear(x, packed, scale, 1.58), dtype)


def test_trits5_every_code_at_every_slot():
    K = 60  # three words; the one-hot rows hit every slot of every byte
    codes = (torch.arange(3 * K).reshape(3, K) % 3).to(torch.uint8)
    codes[1] = codes[1].flip(0)
    packed = pq.pack_codes(codes, 1.58)
    scale = torch.tensor([[1.0], [0.5], [2.0]])
    want = pq.dequantize_codes(codes, scale, 1.58)
    for k in range(K):
        x = torch.zeros(1, K)
        x[0, k] = 1.0
        assert torch.equal(triton_linear(x, packed, scale, 1.58)[0], want[:, k]), k
