"""Conversion to packed weights: ``quantize_(model, ParetoQWeightOnlyConfig(...))`` after QAT and
post-training (RTN), torch.compile / torch.export of converted models, model_size, bf16.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao import quantize_

import paretoq_ao
from paretoq_ao import ParetoQPackedTensor, ParetoQQATConfig, ParetoQQATWeight, ParetoQWeightOnlyConfig, backends

pytestmark = pytest.mark.usefixtures("single_thread")

ALL_BITS = [1, 1.58, 2, 3, 4]
GRANULARITIES = [None, 16]
BITS_X_GRAN = [(b, g) for b in ALL_BITS for g in GRANULARITIES]
IDS = [f"{b}-{'row' if g is None else f'g{g}'}" for b, g in BITS_X_GRAN]
CODE_BITS = {1: 1, 1.58: 2, 2: 2, 3: 3, 4: 4}


def row_bytes(k, bits):
    """Packed bytes per row (packing.py): ternary 5 codes per byte, the others code_bits-wide fields."""
    return math.ceil(k / 5) if bits == 1.58 else math.ceil(k * CODE_BITS[bits] / 8)
N_CODES = {1: 2, 1.58: 3, 2: 4, 3: 8, 4: 16}


def ce(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def packed_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), ParetoQPackedTensor)}


def _train_a_few_steps(model, tokens, steps, lr=5e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        model.loss(tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


# --------------------------------------------------------------------------------------------------
# QAT -> packed
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, 4], ids=["untrained", "trained"])
@pytest.mark.parametrize("bits,group_size", BITS_X_GRAN, ids=IDS)
def test_converted_qat_model_equals_fake_quantized_model(make_decoder, tokens, bits, group_size, steps):
    model = make_decoder()
    quantize_(model, ParetoQQATConfig(bits=bits, group_size=group_size))
    if steps:
        _train_a_few_steps(model, tokens, steps)
    names = model.block_linear_names()
    fq = {n: model.get_submodule(n).weight.fake_quantized().clone() for n in names}
    scales = {n: model.get_submodule(n).weight_scale.detach().clone() for n in names}
    if steps:  # the trained scales are not the initial ones any more
        w = model.blocks[0].up.weight.detach()
        assert not torch.allclose(scales["blocks.0.up"], paretoq_ao.init_scale(w, bits, group_size))
    head = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        expected = model(tokens)
        expected_down = model.blocks[1].down(torch.randn(3, 80, generator=torch.Generator().manual_seed(3)))

    quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size))

    assert sorted(packed_modules(model)) == sorted(names)
    assert type(model.lm_head.weight) is nn.Parameter and torch.equal(model.lm_head.weight, head)
    for n in names:
        mod = model.get_submodule(n)
        w = mod.weight
        assert isinstance(w, ParetoQPackedTensor) and not isinstance(w, ParetoQQATWeight)
        assert w.bits == bits and w.group_size == group_size and w.shape == fq[n].shape
        assert w.qdata.dtype == torch.uint8
        assert w.qdata.shape == (mod.out_features, row_bytes(mod.in_features, bits))
        assert torch.equal(w.scale, scales[n])
        torch.testing.assert_close(w.dequantize(), fq[n], rtol=0, atol=1e-6)
        codes = w.codes()
        assert codes.shape == fq[n].shape and int(codes.max()) < N_CODES[bits]
        assert not hasattr(mod, "weight_scale") and "weight_qat_format" not in dict(mod.named_buffers())
    sd = model.state_dict()
    assert not any(k.endswith("weight_scale") or k.endswith("weight_qat_format") for k in sd)
    with torch.no_grad():
        got = model(tokens)
        got_down = model.blocks[1].down(torch.randn(3, 80, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_down, expected_down, rtol=0, atol=1e-5)


@pytest.mark.parametrize("group_size", [None, 4], ids=["row", "g4"])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_odd_in_features_convert_matches_qat(bits, group_size):
    """K = 20, 12, 44: rows whose packed bit stream ends inside a byte (e.g. 20 x 3 bits = 7.5 bytes)."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 44, bias=False), nn.Linear(44, 7))
    quantize_(model, ParetoQQATConfig(bits=bits, group_size=group_size))
    x = torch.randn(6, 20)
    with torch.no_grad():
        expected = model(x)
    fq = [model[i].weight.fake_quantized() for i in (0, 2, 3)]
    quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size))
    for i, f in zip((0, 2, 3), fq):
        w = model[i].weight
        assert w.qdata.shape == (w.shape[0], row_bytes(w.shape[1], bits))
        torch.testing.assert_close(w.dequantize(), f, rtol=0, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


def test_a_bare_linear_is_converted():
    torch.manual_seed(9)
    lin = nn.Linear(48, 80)
    quantize_(lin, ParetoQQATConfig(bits=3, group_size=16))
    assert isinstance(lin.weight, ParetoQQATWeight)
    x = torch.randn(4, 48)
    with torch.no_grad():
        expected = lin(x)
    quantize_(lin, ParetoQWeightOnlyConfig(bits=3, group_size=16))
    assert isinstance(lin.weight, ParetoQPackedTensor)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), expected, rtol=0, atol=1e-5)


def test_converted_linear_calls_the_paretoq_op(make_decoder, tokens, monkeypatch):
    """Every block linear runs the paretoq op: through the registered op, or (plain eager
    inference) through the op's body `run_linear` directly -- both are spied on."""
    model = make_decoder()
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    calls = []

    class Spy:
        def __init__(self, real):
            self.real = real

        def __call__(self, *args, **kwargs):
            calls.append(args[3] if len(args) > 3 else kwargs.get("bits"))
            return self.real(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.real, name)

    import paretoq_ao.packed as packed_mod

    for name in ("paretoq_linear", "paretoq_linear_8da", "run_linear"):
        monkeypatch.setattr(packed_mod, name, Spy(getattr(packed_mod, name)))
    with torch.no_grad():
        model(tokens)
    assert calls == [2.0] * len(model.block_linear_names())


# --------------------------------------------------------------------------------------------------
# Post-training quantization (RTN)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size", BITS_X_GRAN, ids=IDS)
def test_ptq_equals_fake_quantize_with_init_scale(make_decoder, tokens, bits, group_size):
    model = make_decoder()
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        for n in model.block_linear_names():
            lin = oracle.get_submodule(n)
            lin.weight.copy_(paretoq_ao.fake_quantize(lin.weight, paretoq_ao.init_scale(lin.weight, bits, group_size), bits))
    plain_weights = {n: model.get_submodule(n).weight.detach().clone() for n in model.block_linear_names()}

    quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size))

    for n, w in plain_weights.items():
        packed = model.get_submodule(n).weight
        torch.testing.assert_close(packed.scale, paretoq_ao.init_scale(w, bits, group_size), rtol=0, atol=0)
        torch.testing.assert_close(packed.dequantize(), oracle.get_submodule(n).weight.detach(), rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), oracle(tokens), rtol=0, atol=1e-5)
        x = torch.randn(2, 3, 48)
        lin = model.blocks[0].up
        ref = F.linear(x, paretoq_ao.fake_quantize(plain_weights["blocks.0.up"],
                                                   paretoq_ao.init_scale(plain_weights["blocks.0.up"], bits, group_size),
                                                   bits), lin.bias)
        torch.testing.assert_close(lin(x), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits,group_size", BITS_X_GRAN, ids=IDS)
def test_scale_search_lowers_weight_error(make_decoder, bits, group_size):
    base = make_decoder(seed=3)
    plain = {n: base.get_submodule(n).weight.detach().clone() for n in base.block_linear_names()}
    rtn, searched = copy.deepcopy(base), copy.deepcopy(base)
    quantize_(rtn, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size, scale_search=False))
    quantize_(searched, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size, scale_search=True))
    total_rtn = total_search = 0.0
    for n, w in plain.items():
        e_rtn = ((rtn.get_submodule(n).weight.dequantize() - w) ** 2).sum().item()
        e_search = ((searched.get_submodule(n).weight.dequantize() - w) ** 2).sum().item()
        assert e_search <= e_rtn * (1 + 1e-6), (n, e_search, e_rtn)
        total_rtn += e_rtn
        total_search += e_search
    if bits == 1:
        # mean |W| is already the least-squares scale of sign quantization: search cannot beat it
        assert total_search == pytest.approx(total_rtn, rel=1e-4)
    else:
        assert total_search < 0.99 * total_rtn, (total_search, total_rtn)


# --------------------------------------------------------------------------------------------------
# torch.compile and torch.export of converted models
# --------------------------------------------------------------------------------------------------

# One layer per bit width (mixed granularities), so one compilation covers every format.
MIXED = [("0", 48, 80, True, 1, None), ("2", 80, 48, False, 1.58, 16), ("4", 48, 96, True, 2, None),
         ("6", 96, 64, True, 3, 16), ("8", 64, 40, False, 4, 8)]


def _mixed_model():
    torch.manual_seed(11)
    layers = []
    for _, i, o, bias, _, _ in MIXED:
        layers += [nn.Linear(i, o, bias=bias), nn.GELU()]
    model = nn.Sequential(*layers[:-1])
    for fqn, *_, bits, gs in MIXED:
        quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=gs), filter_fn=lambda m, f, fqn=fqn: f == fqn)
    return model


def test_compiled_converted_model_matches_eager():
    torch._dynamo.reset()
    try:
        model = _mixed_model()
        assert [(n, m.weight.bits, m.weight.group_size) for n, m in packed_modules(model).items()] == \
            [(fqn, bits, gs) for fqn, *_, bits, gs in MIXED]
        x = torch.randn(5, 7, 48)
        with torch.no_grad():
            eager = model(x)
            compiled = torch.compile(model, fullgraph=True)
            got = compiled(x)
            got2 = compiled(x * 2)
            eager2 = model(x * 2)
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got2, eager2, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()


EXPORT_CASES = [(b, None) for b in ALL_BITS] + [(3, 16)]


@pytest.mark.parametrize("bits,group_size", EXPORT_CASES,
                         ids=[f"{b}-{'row' if g is None else f'g{g}'}" for b, g in EXPORT_CASES])
def test_export_contains_one_paretoq_linear(bits, group_size):
    torch._dynamo.reset()
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(48, 80))
    quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size))
    x = torch.randn(4, 48)
    ep = torch.export.export(model, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    ours = [t for t in targets if t is torch.ops.paretoq.linear.default]
    assert len(ours) == 1, targets
    assert not any("mm" in str(t) or "linear" in str(t) for t in targets if t is not torch.ops.paretoq.linear.default)
    node = next(n for n in ep.graph.nodes if n.target is torch.ops.paretoq.linear.default)
    assert float(node.args[3]) == float(bits)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)
        x2 = torch.randn(4, 48)
        torch.testing.assert_close(ep.module()(x2), model(x2), rtol=0, atol=0)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------
# model_size
# --------------------------------------------------------------------------------------------------


def test_model_size_two_bit_per_row_matches_the_theory():
    model = nn.Sequential(nn.Linear(256, 384, bias=False))
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    report = paretoq_ao.model_size(model)
    assert len(report.layers) == 1
    layer = report.layers[0]
    theory = 256 * 384 / 4 + 384 * 4
    assert abs(layer.total_bytes - theory) <= 0.03 * theory
    assert layer.weight_bytes == 256 * 384 // 4 and layer.scale_bytes == 384 * 4
    assert layer.original_bytes == 256 * 384 * 4
    assert report.total_bytes == layer.total_bytes and report.original_bytes == 256 * 384 * 4
    assert report.ratio == pytest.approx((256 * 384 / 4 + 384 * 4) / (256 * 384 * 4))
    assert layer.bits_per_weight == pytest.approx(2 + 32 / 256)


SIZE_SHAPES = [("0", 48, 80, True), ("1", 80, 20, False), ("2", 20, 12, True)]  # K=20: 20*3 bits = 7.5 bytes


@pytest.mark.parametrize("group_size", [None, 4], ids=["row", "g4"])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_model_size_per_layer_rows_and_totals(bits, group_size):
    model = nn.Sequential(*[nn.Linear(i, o, bias=b) for _, i, o, b in SIZE_SHAPES])
    fp32_total = sum(p.numel() * 4 for p in model.parameters())
    before = paretoq_ao.model_size(model)
    assert before.total_bytes == before.original_bytes == fp32_total and before.ratio == 1.0
    assert all(l.bits is None for l in before.layers)

    quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size))
    report = paretoq_ao.model_size(model)
    assert [l.name for l in report.layers] == [n for n, *_ in SIZE_SHAPES]
    bias_bytes = sum(o * 4 for _, _, o, b in SIZE_SHAPES if b)
    assert report.other_bytes == bias_bytes
    expected_total = bias_bytes
    for layer, (name, i, o, _) in zip(report.layers, SIZE_SHAPES):
        groups = 1 if group_size is None else i // group_size
        assert layer.shape == (o, i) and layer.bits == bits and layer.group_size == group_size
        assert layer.weight_bytes == row_bytes(i, bits) * o
        assert layer.scale_bytes == o * groups * 4
        assert layer.original_bytes == i * o * 4
        assert layer.total_bytes == layer.weight_bytes + layer.scale_bytes
        expected_total += layer.total_bytes
    assert report.total_bytes == expected_total
    assert report.original_bytes == fp32_total
    assert report.ratio == pytest.approx(expected_total / fp32_total)
    assert report.quantized_bytes == expected_total - bias_bytes
    text = str(report)
    for name, i, o, _ in SIZE_SHAPES:
        assert f"{o}x{i}" in text
    assert f"{report.total_bytes:,}" in text and f"{report.original_bytes:,}" in text
    # the original dtype can be chosen (bf16 originals: half the bytes)
    bf16 = paretoq_ao.model_size(model, original_dtype=torch.bfloat16)
    assert [l.original_bytes for l in bf16.layers] == [i * o * 2 for _, i, o, _ in SIZE_SHAPES]


def test_model_size_counts_a_tied_head_once(make_decoder):
    model = make_decoder(tie=True)
    unique = {id(t): t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())}
    fp_bytes = sum(unique.values())
    quantize_(model, ParetoQQATConfig(bits=2))
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    report = paretoq_ao.model_size(model)
    assert report.original_bytes == fp_bytes
    head = [l for l in report.layers if l.name == "lm_head"]
    assert len(head) == 1 and head[0].bits is None and head[0].weight_bytes == 64 * 48 * 4
    quantized = [l for l in report.layers if l.bits is not None]
    assert sorted(l.name for l in quantized) == sorted(model.block_linear_names())
    assert report.total_bytes < 0.75 * report.original_bytes


# --------------------------------------------------------------------------------------------------
# bf16
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size", BITS_X_GRAN, ids=IDS)
def test_bf16_qat_and_conversion(make_decoder, tokens, bits, group_size):
    model = make_decoder(dtype=torch.bfloat16)
    quantize_(model, ParetoQQATConfig(bits=bits, group_size=group_size))
    for n in model.block_linear_names():
        m = model.get_submodule(n)
        assert m.weight.dtype == torch.bfloat16 and m.weight_scale.dtype == torch.bfloat16
    _train_a_few_steps(model, tokens, 2, lr=1e-3)
    fq = {n: model.get_submodule(n).weight.fake_quantized().clone() for n in model.block_linear_names()}
    with torch.no_grad():
        expected = model(tokens)
    assert expected.dtype == torch.bfloat16

    quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size))
    for n in model.block_linear_names():
        w = model.get_submodule(n).weight
        assert isinstance(w, ParetoQPackedTensor) and w.dtype == torch.bfloat16 and w.scale.dtype == torch.bfloat16
        torch.testing.assert_close(w.dequantize(), fq[n], rtol=0, atol=0)
    with torch.no_grad():
        got = model(tokens)
        with backends.disabled("all"):  # the plain PyTorch reference computes in bf16, like QAT
            ref = model(tokens)
    assert got.dtype == torch.bfloat16 and ref.dtype == torch.bfloat16
    # bf16 rounding of the separate bias add in the packed path: a few bf16 ulps
    torch.testing.assert_close(ref.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert (ref.float() - expected.float()).abs().mean() < 2e-3
    # the C++ CPU kernels take bf16 activations but accumulate in fp32: a few more bf16 ulps
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert (got.float() - expected.float()).abs().mean() < 4e-3


def test_conversion_with_nonpositive_trained_scales_matches_qat():
    """Training can push a scale to <= 0 (the quantizer clamps it at 1e-5): the packed model must
    still reproduce the QAT model."""
    torch.manual_seed(6)
    for bits, gs in [(1, None), (2, 16), (3, None)]:
        model = nn.Sequential(nn.Linear(48, 40))
        quantize_(model, ParetoQQATConfig(bits=bits, group_size=gs))
        with torch.no_grad():
            model[0].weight_scale[0] = -0.02
            model[0].weight_scale[1] = 0.0
        x = torch.randn(5, 48)
        with torch.no_grad():
            expected = model(x)
        fq = model[0].weight.fake_quantized()
        quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=gs))
        torch.testing.assert_close(model[0].weight.dequantize(), fq, rtol=0, atol=1e-7)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


class _SharedModule(nn.Module):
    def __init__(self):
        super().__init__()
        shared = nn.Linear(32, 32)
        self.a = nn.Sequential(shared, nn.ReLU())
        self.b = nn.Sequential(shared)
        self.c = nn.Linear(32, 16)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_convert_module_shared_by_two_parents():
    torch.manual_seed(0)
    model = _SharedModule()
    x = torch.randn(3, 32)
    with torch.no_grad():
        before = model(x)
    try:
        quantize_(model, ParetoQWeightOnlyConfig(bits=4))
    except ValueError:
        assert type(model.a[0].weight) is nn.Parameter and type(model.c.weight) is nn.Parameter
        with torch.no_grad():
            assert torch.equal(model(x), before)
    else:
        assert isinstance(model.a[0].weight, ParetoQPackedTensor) and isinstance(model.c.weight, ParetoQPackedTensor)
