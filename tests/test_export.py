"""ExecuTorch export: .pte programs run by executorch.runtime with our C++ kernels vs eager."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from torchao import quantize_

from paretoq_ao import ParetoQWeightOnlyConfig, backends, set_activations
import paretoq_ao.export as pe
from paretoq_ao.export import _build

ALL_BITS = [1, 1.58, 2, 3, 4]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    return pe.load_kernels()


def _quantized_mlp(bits, k=100, hidden=37, group_size=None, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(k, hidden), nn.ReLU(), nn.Linear(hidden, 1)).eval()
    quantize_(m, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size),
              filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear))
    return m


def test_load_kernels_once_and_registered(kernels):
    from executorch.runtime import Runtime
    assert pe.load_kernels() == kernels
    assert pe.kernels_loaded()
    names = Runtime.get().operator_registry.operator_names
    assert "paretoq::linear.out" in names and "paretoq::linear_8da.out" in names
    maps = open("/proc/self/maps").read()
    assert len({l.split(None, 5)[-1] for l in maps.splitlines() if l.endswith(_build.LIB_NAME)}) == 1
    assert pe.kernel_path() in ("scalar", "avx2", "avx512", "neon", "neondot")


@pytest.mark.parametrize("op", ["linear", "linear_8da"])
def test_out_variant_reference(op):
    m = _quantized_mlp(2)
    w = m[0].weight
    x = torch.randn(3, 100)
    out = torch.empty(0)
    r = getattr(torch.ops.paretoq, op).out(x, w.qdata, w.scale, 2.0, out=out)
    assert r is out
    torch.testing.assert_close(out, getattr(torch.ops.paretoq, op)(x, w.qdata, w.scale, 2.0), rtol=0, atol=0)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("acts", ["float", "int8"])
def test_pte_equals_eager_model(bits, group_size, acts, tmp_path):
    """Every format x layout x activation mode: the .pte equals the eager packed model (the same
    C++ kernels run both, so bit for bit) and the plain PyTorch reference (to rounding); the
    program records its activation mode."""
    m = _quantized_mlp(bits, k=128, hidden=64, group_size=group_size)
    x = torch.randn(2, 128)
    batch = torch.export.Dim("batch", min=1, max=16)
    path = pe.export_executorch(m, (x,), tmp_path / "m.pte", dynamic_shapes=({0: batch},), activations=acts)
    assert pe.program_activations(path) == acts
    f = pe.load_executorch(path)
    set_activations(m, acts)
    for b in (1, 2, 5):  # dynamic batch (resize_tensor), N = 1 in the second layer
        xb = torch.randn(b, 128)
        with torch.no_grad():
            eager = m(xb)
            with backends.disabled("all"):
                ref = m(xb)
        got = f(xb)
        assert got.shape == eager.shape
        torch.testing.assert_close(got, eager, rtol=0, atol=0)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_export_activations_none_keeps_each_layer_and_bad_value(tmp_path):
    m = _quantized_mlp(2)
    set_activations(m[2], "int8")
    x = torch.randn(1, 100)
    path = pe.export_executorch(m, (x,), tmp_path / "m.pte", activations=None)
    assert pe.program_activations(path) == "mixed"
    with torch.no_grad():
        torch.testing.assert_close(pe.load_executorch(path)(x), m(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="activations must be 'int8', 'float' or None"):
        pe.export_executorch(m, (x,), tmp_path / "n.pte", activations="fp16")
    assert not (tmp_path / "n.pte").exists()


@pytest.mark.parametrize("bits,group_size", [(2, None), (2, 32), (1.58, None), (4, 32), (3, 32)])
def test_pte_int8_activations_match_reference_and_report_error(bits, group_size, tmp_path):
    torch.manual_seed(1)
    lin = nn.Linear(1088, 67).eval()  # K not a multiple of any SIMD chunk
    quantize_(lin, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size),
              filter_fn=lambda mod, fqn: True)
    x = torch.randn(3, 1088)
    path = pe.export_executorch(lin, (x,), tmp_path / "l.pte")  # int8 activations: the default
    assert pe.program_activations(path) == "int8"
    got = pe.load_executorch(path)(x)
    w = lin.weight
    ref_int8 = pe.reference_linear_int8(x, w.qdata, w.scale, bits) + lin.bias
    with torch.no_grad():
        ref_fp = lin(x)
    torch.testing.assert_close(got, ref_int8, rtol=1e-5, atol=1e-5)
    rel = ((got - ref_fp).norm() / ref_fp.norm()).item()
    print(f"\nint8 activations vs fp32: bits={bits} group={group_size} relative L2 error {rel:.3e}")
    assert rel < 2e-2


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    return model


def _generate(step, prompt, n_new):
    seq, logits = list(prompt), []
    with torch.no_grad():
        for i in range(len(prompt) + n_new - 1):
            out = step(torch.tensor([[seq[i]]]), torch.tensor([i]))
            logits.append(out)
            if i >= len(prompt) - 1:
                seq.append(int(out[0, -1].argmax()))
    return seq, torch.cat(logits, 1)


def test_llama_kv_cache_generation_matches_eager(tmp_path):
    from paretoq_ao.export.llama import LlamaKVStep
    model = _tiny_llama()
    ids = torch.tensor([[3, 17, 42, 5, 9]])
    with torch.no_grad():  # the wrapper itself equals the HF model (no cache, full sequence)
        full = model(ids).logits
        wrapped = LlamaKVStep(model, 16)
        stepwise = torch.cat([wrapped(ids[:, i:i + 1], torch.tensor([i])) for i in range(5)], 1)
    torch.testing.assert_close(stepwise, full, rtol=1e-5, atol=1e-5)

    example = (torch.tensor([[1]]), torch.tensor([0]))
    path = pe.export_executorch(LlamaKVStep(model, 16), example, tmp_path / "llama.pte", activations="float")
    prompt = [3, 17, 42]
    seq_e, log_e = _generate(LlamaKVStep(model, 16), prompt, 6)
    seq_p, log_p = _generate(pe.load_executorch(path), prompt, 6)
    assert seq_p == seq_e
    torch.testing.assert_close(log_p, log_e, rtol=1e-5, atol=1e-5)
    # int8 activations (the ExecuTorch default): report the effect on logits and tokens
    path8 = pe.export_executorch(LlamaKVStep(model, 16), example, tmp_path / "llama8.pte")
    seq_q, log_q = _generate(pe.load_executorch(path8), prompt, 6)
    rel = ((log_q - log_e).norm() / log_e.norm()).item()
    agree = sum(a == b for a, b in zip(seq_q, seq_e)) / len(seq_e)
    print(f"\nLlama 2-bit int8 activations: logits relative L2 error {rel:.3e}, token agreement {agree:.2f}")
    assert rel < 5e-2


def test_missing_kernel_library_clear_error(tmp_path):
    m = _quantized_mlp(2)
    path = pe.export_executorch(m, (torch.randn(1, 100),), tmp_path / "m.pte")
    code = textwrap.dedent(f"""
        import paretoq_ao.export as pe
        try:
            pe.load_executorch({str(path)!r}, load_library=False)
        except pe.MissingKernelsError as e:
            print("MISSING:", e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "MISSING:" in r.stdout, r.stdout + r.stderr
    assert "paretoq::linear.out" in r.stdout and "load_kernels()" in r.stdout


def test_no_cmake_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PARETOQ_AO_CACHE", str(tmp_path))
    monkeypatch.setattr(_build.shutil, "which", lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, "cmake", None)
    with pytest.raises(pe.KernelBuildError, match="CMake"):
        _build.build_kernels()


def test_set_num_threads_refuses_while_a_loaded_program_is_alive(tmp_path):
    import gc

    m = _quantized_mlp(2)
    x = torch.randn(3, 100)
    path = pe.export_executorch(m, (x,), tmp_path / "m.pte")
    gc.collect()
    f = pe.load_executorch(path)
    before = f(x)
    with pytest.raises(RuntimeError, match="1 program.*still alive.*before load_executorch"):
        pe.set_num_threads(1)
    with pytest.raises(ValueError, match="positive integer"):
        pe.set_num_threads(0)
    del f
    gc.collect()
    pe.set_num_threads(1)  # nothing alive: allowed
    try:
        g = pe.load_executorch(path)
        torch.testing.assert_close(g(x), before, rtol=0, atol=0)
        del g
        gc.collect()
    finally:
        pe.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
