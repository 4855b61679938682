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
from _pte_zoo import CASES as ZOO_CASES, K as ZOO_K, case_id

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


@pytest.mark.parametrize("bits,layout", ZOO_CASES, ids=[case_id(b, g) for b, (g, _, _) in ZOO_CASES])
@pytest.mark.parametrize("acts", ["float", "int8"])
def test_pte_equals_eager_model(bits, layout, acts, pte_zoo):
    """Every format x layout x activation mode: the .pte equals the eager packed model (the same
    C++ kernels run both, so bit for bit) and the plain PyTorch reference (to rounding); the
    program records its activation mode. One shared program holds every case (tests/_pte_zoo.py)."""
    group_size = layout[0]
    path = pte_zoo.path(acts)
    assert pe.program_activations(path) == acts
    f = pe.load_executorch(path)
    m = pte_zoo.model
    set_activations(m, acts)
    for b in (1, 2, 5):  # dynamic batch (resize_tensor); N = 1 in the third layer of each case
        xb = torch.randn(b, ZOO_K)
        with torch.no_grad():
            eager = m.branch(bits, group_size)(xb)
            with backends.disabled("all"):
                ref = m.branch(bits, group_size)(xb)
        got = m.outputs(f(xb), bits, group_size)
        for g, e, r in zip(got, eager, ref):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, rtol=0, atol=0)
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize("attention", ["custom", "reference"])
def test_llama_attention_modes_agree_eager_and_exported(tmp_path, attention):
    """Both KV-step attention paths equal the Hugging Face model run on the whole sequence, eager
    (a multi-token call too) and as a .pte; "custom" runs ExecuTorch's llama::custom_sdpa /
    update_cache kernels (read from the program), "reference" only plain ops. The cache is longer
    than the sequence: the custom kernels must attend to the written rows only."""
    from paretoq_ao.export.llama import LlamaKVStep, export_llama
    model = _tiny_llama()
    ids = torch.tensor([[3, 17, 42, 5, 9, 11, 2]])
    with torch.no_grad():
        full = model(ids).logits
        step = LlamaKVStep(model, 48, attention=attention)
        first = step(ids[:, :4], torch.arange(4))  # the prompt in one call
        rest = torch.cat([step(ids[:, i:i + 1], torch.tensor([i])) for i in range(4, 7)], 1)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)
    path = export_llama(model, tmp_path / f"{attention}.pte", max_len=48, activations="float",
                        attention=attention)["path"]
    ops = pe._ops_used(path)
    assert ops["llama"] == (attention == "custom")
    run = pe.load_executorch(path)
    got = torch.cat([run(ids[:, i:i + 1], torch.tensor([i])) for i in range(7)], 1)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


def test_llama_bad_attention_is_refused_naming_it(tmp_path):
    from paretoq_ao.export.llama import LlamaKVStep, export_llama
    model = _tiny_llama()
    with pytest.raises(ValueError, match="attention must be one of"):
        export_llama(model, tmp_path / "x.pte", attention="flash")
    with pytest.raises(ValueError, match="attention must be one of"):
        LlamaKVStep(model, 8, attention="flash")
    assert not (tmp_path / "x.pte").exists()


def test_llama_custom_attention_without_its_kernels_is_a_clear_error(tmp_path, monkeypatch):
    """Where ExecuTorch's LLM kernels do not load: building the custom step says so and names the
    alternative; loading a program that uses them raises MissingKernelsError naming them (not the
    runtime's bare error)."""
    import paretoq_ao.export._llm_ops as llm_ops
    import paretoq_ao.export.llama as llama
    model = _tiny_llama()
    path = llama.export_llama(model, tmp_path / "c.pte", max_len=8, attention="custom")["path"]
    monkeypatch.setattr(llama, "custom_ops_available", lambda: False)
    monkeypatch.setattr(llm_ops, "custom_ops_available", lambda: False)
    with pytest.raises(RuntimeError, match="attention='reference'"):
        llama.LlamaKVStep(model, 8)
    with pytest.raises(pe.MissingKernelsError, match="llama::custom_sdpa"):
        pe.load_executorch(path)


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


# --------------------------------------------------------------------------- dtypes refused / converted

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_export_refuses_non_float32_example_inputs(dtype, tmp_path):
    """A floating example input that is not float32 would give a program that can never run (the
    kernels take float32): one-line TypeError naming the input's index and dtype, nothing written."""
    m = _quantized_mlp(2)
    with pytest.raises(TypeError, match=rf"example input 0 is {dtype}.*float32") as e:
        pe.export_executorch(m, (torch.randn(2, 100, dtype=dtype),), tmp_path / "m.pte")
    assert "\n" not in str(e.value)

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = m

        def forward(self, ids, x):
            return self.mlp(x) + ids

    with pytest.raises(TypeError, match=rf"example input 1 is {dtype}"):
        pe.export_executorch(TwoInputs(), (torch.tensor([1]), torch.randn(2, 100, dtype=dtype)), tmp_path / "m.pte")
    assert not (tmp_path / "m.pte").exists()
    assert not [n for n in os.listdir(tmp_path)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_to_float32_makes_a_half_precision_packed_model_exportable(dtype, tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval().to(dtype)
    quantize_(m, ParetoQWeightOnlyConfig(bits=2, group_size=32), filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear))
    x = torch.randn(3, 64)
    with pytest.raises(TypeError, match=rf"0.weight has {dtype} scales.*to_float32\(model\)"):
        pe.export_executorch(m, (x,), tmp_path / "m.pte")
    assert not (tmp_path / "m.pte").exists()
    qdata = {n: p.qdata for n, p in m.named_parameters() if hasattr(p, "qdata")}
    scales = {n: p.scale.clone() for n, p in m.named_parameters() if hasattr(p, "qdata")}
    changed = pe.to_float32(m)
    assert changed == {"0.weight": dtype, "0.bias": dtype, "2.weight": dtype, "2.bias": dtype}
    for n, p in m.named_parameters():
        assert p.dtype == torch.float32, n
        if n in qdata:
            # the codes are kept as they are (the same storage, not a re-quantization)
            assert p.qdata.data_ptr() == qdata[n].data_ptr() and torch.equal(p.qdata, qdata[n])
            assert p.scale.dtype == torch.float32
            assert torch.equal(p.scale, scales[n].float())  # upcasting is exact
    assert pe.to_float32(m) == {}  # already float32
    path = pe.export_executorch(m, (x,), tmp_path / "m.pte", activations="float")
    with torch.no_grad():
        torch.testing.assert_close(pe.load_executorch(path)(x), m(x), rtol=0, atol=0)


def test_export_refuses_a_qat_model(tmp_path):
    from paretoq_ao import ParetoQQATConfig

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    quantize_(m, ParetoQQATConfig(bits=2), filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear))
    with pytest.raises(ValueError, match=r"layer '0' still holds ParetoQ QAT weights \(bits=2, group_size=None\).*"
                                         r"ParetoQWeightOnlyConfig\(bits=2, group_size=None\)") as e:
        pe.export_executorch(m, (torch.randn(1, 64),), tmp_path / "m.pte")
    assert "FSDP" not in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "m.pte").exists()


# --------------------------------------------------------------------------- NaN / Inf tokens

def _assert_nonfinite_like_eager(got, want, what, atol=0.0):
    """NaN exactly where ``want`` has NaN, the same infinities with the same signs, finite values
    equal within ``atol``."""
    assert got.shape == want.shape, what
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN positions differ"
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), f"{what}: +Inf positions differ"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{what}: -Inf positions differ"
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=atol, atol=atol, msg=what)


@pytest.mark.parametrize("bits,layout", ZOO_CASES, ids=[case_id(b, g) for b, (g, _, _) in ZOO_CASES])
@pytest.mark.parametrize("acts", ["int8", "float"])
def test_pte_propagates_nan_and_inf_like_eager(bits, layout, acts, pte_zoo):
    """A packed Linear on the raw input and a small model after it (ReLU -> Linear, 19 and 1 rows),
    int8 and float activations: a batch with a NaN row, a +Inf row and a -Inf row gives NaN / Inf
    where eager does (same signs), and the finite rows equal eager (the same kernels) and the plain
    PyTorch reference."""
    group_size = layout[0]
    torch.manual_seed(0)
    x = torch.randn(5, ZOO_K)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    x[3, 9] = -float("inf")
    m = pte_zoo.model
    run = pe.load_executorch(pte_zoo.path(acts))
    got_all, got_finite = m.outputs(run(x), bits, group_size), m.outputs(run(x[[0, 4]]), bits, group_size)
    set_activations(m, acts)
    with torch.no_grad():
        eager_all = m.branch(bits, group_size)(x)
        with backends.disabled("all"):
            ref_all = m.branch(bits, group_size)(x)
    for i, kind in enumerate(("linear", "model (19 rows)", "model (1 row)")):
        got, eager, ref = got_all[i], eager_all[i], ref_all[i]
        what = f"{kind} bits={bits} group_size={group_size} activations={acts}"
        assert torch.isnan(eager[1]).all(), what  # the NaN row is NaN everywhere
        assert not torch.isfinite(eager[2]).any() and not torch.isfinite(eager[3]).any(), what
        if kind == "linear":  # one Inf input: +-Inf by the weight's sign (NaN where it is 0)
            assert torch.isinf(eager[2]).any() and torch.isinf(eager[3]).any(), what
        assert torch.isfinite(eager[[0, 4]]).all(), what
        _assert_nonfinite_like_eager(got, eager, what + " (.pte vs eager)")
        _assert_nonfinite_like_eager(got, ref, what + " (.pte vs reference)", atol=1e-4)
        # the finite rows are those of a batch without the bad rows
        torch.testing.assert_close(got[[0, 4]], got_finite[i], rtol=0, atol=0)


# --------------------------------------------------------------------------- damaged .pte files

def test_load_executorch_refuses_damaged_files_without_crashing(tmp_path):
    """Empty, random, foreign and truncated files: one-line ValueError naming the path (the runtime
    alone aborts the process with SIGABRT on random bytes), a missing file FileNotFoundError.
    Run in a subprocess: a crash would otherwise take pytest down with it."""
    m = _quantized_mlp(2)
    real = pe.export_executorch(m, (torch.randn(1, 100),), tmp_path / "real.pte")
    data = open(real, "rb").read()
    assert data[4:8] == b"ET12" and data[8:12] == b"eh00"
    rng = torch.Generator().manual_seed(0)
    noise = bytes(torch.randint(0, 256, (len(data),), generator=rng, dtype=torch.uint8).tolist())
    noise = noise[:4] + b"\x91\xd0\x8f\x87" + noise[8:]  # not UTF-8: what made the runtime abort
    files = {
        "empty.pte": b"",
        "tiny.pte": b"ET12",
        "random.pte": noise,
        "text.pte": b"this is not a program, just some text\n" * 20,
        "half.pte": data[: len(data) // 2],
        "short.pte": data[:-16],
        "head.pte": data[:40],
        "header-then-noise.pte": data[:64] + noise[64:],  # valid header, corrupt flatbuffer
        "no-ext-header.pte": data[:8] + noise[8: len(data) // 2],
    }
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
    code = textwrap.dedent(f"""
        import os, sys
        import paretoq_ao.export as pe
        folder = {str(tmp_path)!r}
        for name in sorted(os.listdir(folder)) + ["missing.pte"]:
            path = os.path.join(folder, name)
            try:
                f = pe.load_executorch(path)
                print("LOADED", name, flush=True)
            except (ValueError, FileNotFoundError) as e:
                print("ERR", name, type(e).__name__, str(e).replace(chr(10), "<NL>"), flush=True)
            if name != "real.pte":
                try:
                    pe.program_activations(path)
                    print("ACTS", name, flush=True)
                except (ValueError, FileNotFoundError) as e:
                    print("AERR", name, type(e).__name__, flush=True)
        print("DONE", flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "DONE" in r.stdout, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    lines = {l.split()[1]: l for l in r.stdout.splitlines() if l.startswith(("ERR", "LOADED"))}
    assert lines["real.pte"].startswith("LOADED")
    for name in list(files) + ["missing.pte"]:
        line = lines[name]
        want = "FileNotFoundError" if name == "missing.pte" else "ValueError"
        assert line.startswith(f"ERR {name} {want} "), line
        assert os.path.join(str(tmp_path), name) in line and "<NL>" not in line, line
        if name not in ("header-then-noise.pte", "no-ext-header.pte"):  # the header shows the damage:
            assert f"AERR {name} {want}" in r.stdout, r.stdout  # program_activations refuses it too
    assert "is empty" in lines["empty.pte"] and "not an ExecuTorch program" in lines["random.pte"]
    assert "is truncated" in lines["half.pte"] and "is truncated" in lines["short.pte"]
    assert "no such file" in lines["missing.pte"]
    assert "runtime refused it" in lines["header-then-noise.pte"]
