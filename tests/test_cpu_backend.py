"""The C++ kernels as the CPU backend of paretoq::linear / paretoq::linear_8da in PyTorch: against the
plain PyTorch reference for every format, scale layout and M band, through F.linear on the packed
subclass, torch.compile(fullgraph=True) and Hugging Face generate(), with call counters proving the
C++ kernels ran; the backend registry's choices, fallbacks and warnings; bad input."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchao import quantize_

import paretoq_ao as pq
from paretoq_ao import backends
from paretoq_ao.export import cpu_backend
from paretoq_ao.ops import reference_linear, reference_linear_8da

ALL_BITS = [1, 1.58, 2, 3, 4]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert cpu_backend.available(), "the C++ CPU kernels must build here"


def _packed_linear(k, n, bits, group_size, acts="float", seed=0, bias=False):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    quantize_(lin, pq.ParetoQWeightOnlyConfig(bits=bits, group_size=group_size, activations=acts),
              filter_fn=lambda m, f: True)
    return lin


def _calls():
    return cpu_backend.call_count(False), cpu_backend.call_count(True)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group_size", [None, 32, 64, 128, 256])
@pytest.mark.parametrize("m", [1, 3, 16, 70])
def test_float_activations_equal_reference(bits, group_size, m):
    lin = _packed_linear(512, 37, bits, group_size)  # N = 37: a partial row block
    w = lin.weight
    x = torch.randn(m, 512)
    before = _calls()
    got = F.linear(x, w)
    assert _calls()[0] == before[0] + 1
    torch.testing.assert_close(got, reference_linear(x, w.qdata, w.scale, bits), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group_size", [None, 32, 128])
@pytest.mark.parametrize("m", [1, 5, 64])
def test_int8_activations_equal_reference(bits, group_size, m):
    lin = _packed_linear(384, 21, bits, group_size, acts="int8")
    w = lin.weight
    x = torch.randn(m, 384)
    before = _calls()
    got = lin(x)
    assert _calls()[1] == before[1] + 1
    ref = reference_linear_8da(x, w.qdata, w.scale, bits)  # same arithmetic, float64 sums
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    exact = reference_linear(x, w.qdata, w.scale, bits)
    assert ((got - exact).norm() / exact.norm()).item() < 0.03  # int8 activation error, stated


@pytest.mark.parametrize("k,n,group_size", [(1, 1, None), (37, 1, None), (129, 5, None), (48, 16, 24),
                                            (96, 3, 12), (1000, 17, 8), (80, 9, 16)])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_odd_shapes_and_unaligned_groups(k, n, group_size, bits):
    lin = _packed_linear(k, n, bits, group_size, bias=True)
    w = lin.weight
    x = torch.randn(2, 3, k)  # leading dims are flattened and restored
    got = lin(x)
    assert got.shape == (2, 3, n)
    torch.testing.assert_close(got, reference_linear(x, w.qdata, w.scale, bits) + lin.bias, rtol=2e-5, atol=2e-5)
    plan = cpu_backend.plan(x, w.qdata, w.scale, bits)
    fmt = pq.get_format(bits)
    b = fmt.code_bits
    if fmt.storage == "trits5":  # planes of 4 codes; no group end inside a short last word
        aligned = group_size is None or (group_size % 4 == 0 and group_size >= k % 20)
    else:
        aligned = group_size is None or (group_size % 4 == 0 if b == 3 else group_size * b % 32 == 0)
    assert plan.startswith("scalar") != aligned, plan
    if not aligned:
        assert f"group_size {group_size}" in plan


def test_bf16_and_fp16_inputs_run_the_kernels_fp64_falls_back_once():
    lin = _packed_linear(256, 40, 2, 64)
    w = lin.weight
    for dt in (torch.bfloat16, torch.float16):
        x = torch.randn(4, 256).to(dt)
        before = _calls()[0]
        got = F.linear(x, w)
        assert got.dtype == dt and _calls()[0] == before + 1
        ref = reference_linear(x.float(), w.qdata, w.scale, 2)
        torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2)
    backends._warned.clear()
    x64 = torch.randn(2, 256, dtype=torch.float64)
    with pytest.warns(backends.BackendFallbackWarning, match="float64"):
        F.linear(x64, w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second fallback for the same reason is quiet
        F.linear(x64, w)


def test_each_call_is_validated_once(monkeypatch):
    import paretoq_ao.ops as ops

    lin = _packed_linear(128, 8, 2, None)
    n = []
    real = ops.check_linear_args
    monkeypatch.setattr(ops, "check_linear_args", lambda *a: (n.append(1), real(*a))[1])
    lin(torch.randn(2, 128))
    assert len(n) == 1


def test_compiled_model_calls_the_cpp_kernels_and_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64))
    quantize_(m, pq.ParetoQWeightOnlyConfig(bits=3, group_size=32), filter_fn=lambda mod, f: isinstance(mod, nn.Linear))
    x = torch.randn(5, 128)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True)
    before = _calls()[0]
    got = compiled(x)
    assert _calls()[0] == before + 2  # both layers ran the C++ kernels inside the compiled graph
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    pq.set_activations(m, "int8")
    torch._dynamo.reset()
    before8 = _calls()[1]
    got8 = torch.compile(m, fullgraph=True)(x)
    assert _calls()[1] == before8 + 2
    torch.testing.assert_close(got8, m(x), rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("acts", ["float", "int8"])
def test_compiled_inference_graph_calls_the_cpp_op_with_no_python(monkeypatch, acts):
    """Under no_grad a compiled graph names paretoq_cpu::linear itself: the Python body of the
    paretoq:: custom ops (ops.run_linear) never runs, the C++ kernels serve every layer, and the
    results equal eager bit for bit, for M = 1, 7 and 33 through one dynamic graph."""
    import paretoq_ao.ops as ops

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64))
    quantize_(m, pq.ParetoQWeightOnlyConfig(bits=2, group_size=32, activations=acts),
              filter_fn=lambda mod, f: isinstance(mod, nn.Linear))
    xs = [torch.randn(mm, 128) for mm in (1, 7, 33)]
    mode = acts == "int8"
    with torch.no_grad():
        eager = [m(x) for x in xs]
        bodies = []
        real = ops.run_linear
        monkeypatch.setattr(ops, "run_linear", lambda *a: (bodies.append(1), real(*a))[1])
        compiled = torch.compile(m, fullgraph=True, dynamic=True)
        before = _calls()[mode]
        got = [compiled(x) for x in xs]
    assert bodies == []
    assert _calls()[mode] == before + 2 * len(xs)
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    torch._dynamo.reset()


def test_compiled_graph_keeps_the_backend_chosen_when_traced():
    """The backend is chosen when torch.compile traces: a graph traced inside disabled("cpu") runs
    the reference (no C++ call); after torch.compiler.reset() a new trace uses the kernels again.
    And a training graph (input needing a gradient) keeps the custom op, whose gradient flows."""
    torch._dynamo.reset()
    lin = _packed_linear(64, 16, 3, None)
    x = torch.randn(4, 64)
    key = lin.weight._stable_hash_for_caching()  # torch.compile's cache key: differs when "cpu" is off
    assert "cpu+op" in key.rsplit(":", 1)[1].split(",")
    with backends.disabled("cpu"):
        off = lin.weight._stable_hash_for_caching()
    assert off != key and "cpu" not in off.rsplit(":", 1)[1]
    with torch.no_grad():
        want = reference_linear(x, lin.weight.qdata, lin.weight.scale, 3)
        with backends.disabled("cpu"):
            f = torch.compile(lin, fullgraph=True)
            before = _calls()[0]
            torch.testing.assert_close(f(x), want)
        assert _calls()[0] == before
        torch.compiler.reset()
        torch.testing.assert_close(torch.compile(lin, fullgraph=True)(x), want)
        assert _calls()[0] == before + 1
    torch.compiler.reset()
    xg = x.clone().requires_grad_(True)
    torch.compile(lin, fullgraph=True)(xg).sum().backward()
    xe = x.clone().requires_grad_(True)
    lin(xe).sum().backward()
    torch.testing.assert_close(xg.grad, xe.grad)
    torch.compiler.reset()


def test_hf_generate_uses_the_kernels():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    quantize_(model, pq.ParetoQWeightOnlyConfig(bits=2))
    ids = torch.tensor([[3, 17, 42, 5]])
    before = _calls()[0]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
        with backends.disabled("cpu"):
            ref = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert _calls()[0] - before >= 5 * 2 * 7  # 5 steps x 2 layers x 7 block linears
    assert out.tolist() == ref.tolist()


def test_kernels_split_rows_over_torch_threads():
    """torch.set_num_threads drives the C++ kernels: at::parallel_for is a header template that runs
    serially unless the library is compiled with OpenMP, so a build without it would silently use
    one core. Checked by how many row ranges the last call ran as, not by timing."""
    assert cpu_backend.parallel_backend() == "openmp"
    lin = _packed_linear(256, 512, 2, None)  # 32 row blocks of 16: enough for two threads
    x = torch.randn(1, 256)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y2 = F.linear(x, lin.weight)
        assert cpu_backend.last_row_chunks() == 2
        torch.set_num_threads(1)
        y1 = F.linear(x, lin.weight)
        assert cpu_backend.last_row_chunks() == 1
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)  # rows are independent: no summation change


def test_registry_lists_backends_and_disabled_restores():
    names = [b.name for b in backends.registered_backends()]
    assert names.index("triton") < names.index("cpu")  # Triton first (CUDA / interpreter only)
    lin = _packed_linear(64, 8, 2, None)
    x = torch.randn(1, 64)
    with backends.disabled("cpu"):
        before = _calls()[0]
        lin(x)
        assert _calls()[0] == before
    before = _calls()[0]
    lin(x)
    assert _calls()[0] == before + 1


def test_cpp_op_rejects_bad_shapes_naming_them():
    lin = _packed_linear(64, 8, 2, None)
    w = lin.weight
    with pytest.raises(RuntimeError, match="K=60"):
        torch.ops.paretoq_cpu.linear(torch.randn(2, 60), w.qdata, w.scale, 2.0, False)
    with pytest.raises(RuntimeError, match=r"bits=2\.5"):
        torch.ops.paretoq_cpu.linear(torch.randn(2, 64), w.qdata, w.scale, 2.5, False)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.paretoq_cpu.linear(torch.randn(2, 64), w.qdata, w.scale[:4], 2.0, False)
    with pytest.raises(RuntimeError, match="uint8"):
        torch.ops.paretoq_cpu.linear(torch.randn(2, 64), w.qdata.int(), w.scale, 2.0, False)


def _run_isolated(code: str, env: dict):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=full)


_FALLBACK = """
    import warnings, torch, torch.nn as nn
    from torchao import quantize_
    import paretoq_ao as pq
    from paretoq_ao.ops import reference_linear
    lin = nn.Linear(64, 8, bias=False)
    quantize_(lin, pq.ParetoQWeightOnlyConfig(bits=2), filter_fn=lambda m, f: True)
    x = torch.randn(3, 64)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y = lin(x)
        lin(x)
    torch.testing.assert_close(y, reference_linear(x, lin.weight.qdata, lin.weight.scale, 2))
    msgs = [str(m.message) for m in w if issubclass(m.category, pq.backends.BackendFallbackWarning)]
    print("WARNINGS", len(msgs))
    print("KEY", pq.backends.trace_key("cpu"))  # the compile-cache key part: no "cpu" where it is off
    for m in msgs:
        print("MSG", m)
"""


def test_no_compiler_warns_once_naming_it_and_runs_the_reference(tmp_path):
    r = _run_isolated(_FALLBACK, {"PARETOQ_AO_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-such-c++"),
                                  "PATH": str(tmp_path)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNINGS 1" in r.stdout, r.stdout + r.stderr
    assert "C++" in r.stdout and ("compiler" in r.stdout or "CMake" in r.stdout)


def test_disabled_by_environment_is_quiet(tmp_path):
    r = _run_isolated(_FALLBACK, {"PARETOQ_CPU_KERNELS": "0"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNINGS 0" in r.stdout
    key = next(line for line in r.stdout.splitlines() if line.startswith("KEY"))
    assert "cpu" not in key  # not ready: a graph cached where the kernels ran is not reused here
