"""The compiled Triton kernels of ``paretoq::linear`` on a real CUDA GPU.

The interpreter tests (tests/test_triton_kernels.py) check the kernels' arithmetic on the CPU;
this file runs the same kernels compiled for the GPU (sm_90 on an H100/H200), where block sizes,
layouts, atomics, split-K, bf16 arithmetic, the autotuner and CUDA-graph capture are real:

* every kernel kind forced through ``config=`` (gemv, gemvw, gemm, gemmw) x bits x per-row / group
  scales x bf16 / fp16 x {K a multiple of the tile, K with a partial last tile + split-K};
* the autotuner (one shape per path: M = 1, 16, 300 on a 4096 x 4096 2-bit layer);
* ``warmup`` then ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), a capture without
  warmup (warning + default config), ``torch.compile(fullgraph=True)`` without graph breaks;
* bad input on CUDA (fp64, K mismatch, mixed devices).

The oracle is ``paretoq_ao.ops.reference_linear`` in float64 on the same GPU. Skipped (whole
module) without CUDA or when TRITON_INTERPRET is set. Run it in its own pytest process, apart from
tests/test_triton_kernels.py: whichever of the two imports ``paretoq_ao.triton_kernels`` first
decides whether the kernels are compiled or interpreted for the whole process.
Runtime on an H100 (estimated from sm_90 compile times without a GPU): about 4 minutes serially,
mostly Triton compilation (~160 kernels for the forced matrix, ~70 for the autotuner, inductor for
the compiled models); with pytest-xdist ``-n 4`` (benchmarks/run_gpu.sh check) about 1.5 minutes.
"""

import os
import warnings

import pytest
import torch
from torch import nn

if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on"):
    pytest.skip("TRITON_INTERPRET is set: these tests run the compiled kernels on a CUDA GPU "
                "(the interpreter tests are tests/test_triton_kernels.py)", allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("no CUDA device (torch.cuda.is_available() is False): these tests run the compiled "
                "Triton kernels on an NVIDIA GPU; tests/test_triton_kernels.py checks them under the "
                "interpreter", allow_module_level=True)

try:
    import paretoq_ao as pq
    from paretoq_ao.ops import reference_linear
    from paretoq_ao.triton_kernels import (
        KernelConfig, clear_cache, default_config, model_shapes, supports, triton_linear,
        tuned_configs, warmup,
    )
    from paretoq_ao.triton_kernels import linear as L
    from paretoq_ao.triton_kernels import tuning
except ImportError as e:  # paretoq_ao imports torchao (packed.py); the GPU image has none
    pytest.skip(f"paretoq_ao.triton_kernels cannot be imported ({type(e).__name__}: {e}); on the GPU "
                "machine install the project (pip install --no-deps --no-build-isolation -e .) and "
                "carry the torchao wheel (benchmarks/run_gpu.sh does both)", allow_module_level=True)

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if isinstance(L._gemm_kernel, InterpretedFunction):
    pytest.skip("paretoq_ao.triton_kernels was imported under TRITON_INTERPRET=1 (by "
                "tests/test_triton_kernels.py?): the kernels are interpreted in this process; "
                "run this file in its own pytest process", allow_module_level=True)

DEVICE = torch.device("cuda", torch.cuda.current_device())
BITS = [1, 1.58, 2, 3, 4]
DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
CAPTURE_WARNING = "during CUDA graph capture"


# The tuned-config files shipped for GPU models (tuning.load_configs); the tests below run with
# none loaded (see _fresh_tuning_state) except test_shipped_configs_are_legal_here.
SHIPPED_CONFIGS_DIR = getattr(tuning, "SHIPPED_CONFIGS_DIR", None)


@pytest.fixture(autouse=True)
def _fresh_tuning_state(monkeypatch, tmp_path):
    """Every test starts and ends with an empty autotune cache, autotuning on, no tuned-config
    files loaded (neither shipped ones nor $PARETOQ_TRITON_CONFIGS), and non-deterministic
    algorithms allowed (split-K configs are then legal)."""
    monkeypatch.delenv("PARETOQ_TRITON_AUTOTUNE", raising=False)
    monkeypatch.delenv("PARETOQ_TRITON_CONFIGS", raising=False)
    monkeypatch.setattr(tuning, "SHIPPED_CONFIGS_DIR", str(tmp_path), raising=False)
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    clear_cache()
    yield
    clear_cache()
    torch.use_deterministic_algorithms(det)


# ---------------------------------------------------------------------------------------------
# Helpers (small copies of those in test_triton_kernels.py: importing that module would set
# TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------


def make_weight(N, K, bits, group_size=None, dtype=torch.bfloat16, seed=0):
    """Packed codes (uint8 [N, ceil(K * b / 8)]) and scales ([N, G] in ``dtype``) on the GPU."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w = torch.randn(N, K, generator=g, device=DEVICE)
    scale = pq.init_scale(w, bits, group_size)
    packed = pq.pack_codes(pq.quantize_codes(w, scale, bits), bits)
    return packed, scale.to(dtype)


def make_x(shape, dtype=torch.bfloat16, seed=1):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEVICE).to(dtype)


def oracle(x, packed, scale, bits):
    """reference_linear in float64 on the GPU (weights dequantized exactly from the stored scales)."""
    return reference_linear(x.double(), packed, scale.double(), bits)


def assert_close(out, ref, dtype, what=""):
    """max |out - ref| <= tol(dtype) * max |ref| (bf16 2e-2, fp16 5e-3, fp32 1e-4)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.device == ref.device, f"{what}: device {out.device} != {ref.device}"
    out, ref = out.double(), ref.double()
    assert bool(torch.isfinite(out).all()), f"{what}: non-finite values in the output"
    mag = ref.abs().max().item() + 1e-12
    err = (out - ref).abs().max().item()
    tol = TOL[dtype]
    worst = int((out - ref).abs().argmax().item())
    assert err <= tol * mag, (f"{what}: max abs err {err:.3g} > {tol} * max|ref| ({mag:.3g}) "
                              f"at flat index {worst} of shape {tuple(out.shape)}")


def problem_of(x, packed, scale, bits):
    return L._prepare(x, packed, scale, bits, None)[0]


# ---------------------------------------------------------------------------------------------
# Every kernel kind, forced
# ---------------------------------------------------------------------------------------------

N_ODD = 4099  # odd N: the last row tile is partial
K_EVEN = 1024  # a multiple of every tile (and of 256)
K_TAIL = 640  # whole words at every width and a multiple of 128, but 2.5 tiles of 256
GEMV_KINDS = ("gemv", "gemvw")
WORD_KINDS = ("gemvw", "gemmw")


def forced_case(kind, case, group_size):
    """(M, K, config dict, expected scale mode, expected K splits) of a forced launch.

    even: K = 1024, whole K tiles, no split-K; group scales hold whole tiles (one scale per row
    per tile, mode 1). tail_split: K = 640 with BLOCK_K = 256 (a partial last tile, the masked
    path), split-K 2 (fp32 atomics); group-128 scales are then gathered per element (mode 2)
    except by the word GEMV, which needs groups holding whole tiles (BLOCK_K 128: mode 1, 5 tiles
    split 3 + 2)."""
    gemv = kind in GEMV_KINDS
    if case == "even":
        M, K = (1 if gemv else 300), K_EVEN
        if kind == "gemv":
            cfg = dict(kind=kind, block_n=32, block_k=128)
        elif kind == "gemvw":
            cfg = dict(kind=kind, block_n=64, block_k=128)
        else:
            cfg = dict(kind=kind, block_m=64, block_n=64, block_k=128, group_m=8, num_warps=4,
                       num_stages=3)
        mode = 1 if group_size else 0
        splits = 1
    else:
        M, K = (3 if gemv else 7), K_TAIL
        bk = 128 if (kind == "gemvw" and group_size) else 256
        if kind == "gemv":
            cfg = dict(kind=kind, block_n=16, block_k=bk, split_k=2)
        elif kind == "gemvw":
            cfg = dict(kind=kind, block_n=128, block_k=bk, split_k=2)
        else:
            cfg = dict(kind=kind, block_m=16, block_n=32, block_k=bk, split_k=2, num_warps=4,
                       num_stages=2)
        mode = 0 if not group_size else (1 if group_size % bk == 0 else 2)
        splits = 2
    return M, K, cfg, mode, splits


@pytest.mark.parametrize("case", ["even", "tail_split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group_size", [None, 128], ids=["row", "g128"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("kind", ["gemv", "gemvw", "gemm", "gemmw"])
def test_forced_kernel(kind, bits, group_size, dtype, case):
    M, K, cfg, mode, splits = forced_case(kind, case, group_size)
    packed, scale = make_weight(N_ODD, K, bits, group_size, dtype, seed=K + int(10 * bits))
    x = make_x((M, K), dtype, seed=M)
    problem = problem_of(x, packed, scale, bits)
    kc = KernelConfig(**cfg)
    # the case exercises what it says (guards the test against changes of the helpers)
    assert problem.N == N_ODD and problem.K == K and problem.M == M
    assert L.scale_mode(problem, kc) == mode
    assert L.split_plan(K, kc.block_k, kc.split_k)[0] == splits
    if kind in WORD_KINDS:
        ok = L.word_kernel_ok(problem, kc) if kind == "gemvw" else L.word_gemm_ok(problem, kc)
        # 1/2/4-bit rows of whole words must be served; 3-bit ones are served since the 3-bit
        # word units (three words), and before them had to be refused with a clear error
        assert ok or bits == 3, f"{kind} should serve {bits}-bit rows of whole words: {problem}"
        if not ok:
            with pytest.raises(ValueError, match=r"cannot serve.*bits=3"):
                triton_linear(x, packed, scale, bits, config=cfg)
            return
    out = triton_linear(x, packed, scale, bits, config=cfg)
    assert out.dtype == dtype and out.device == x.device
    assert_close(out, oracle(x, packed, scale, bits), dtype,
                 f"{kind} {cfg} bits={bits} group={group_size} M={M} N={N_ODD} K={K}")


@pytest.mark.parametrize("kind,M,cfg", [
    ("gemv", 1, dict(kind="gemv", block_n=32, block_k=128, split_k=2)),
    ("gemvw", 2, dict(kind="gemvw", block_n=64, block_k=256, split_k=1)),
    ("gemm", 33, dict(kind="gemm", block_m=16, block_n=64, block_k=64, split_k=1, num_stages=3)),
    ("gemmw", 33, dict(kind="gemmw", block_m=16, block_n=64, block_k=64, split_k=2, num_stages=3)),
], ids=["gemv", "gemvw", "gemm", "gemmw"])
def test_float32_activations_and_output(kind, M, cfg):
    # fp32 activations and scales (IEEE dot products: float32 matmul precision "highest"), and
    # fp16 activations with a float32 output (split-K: the fp32 atomic buffer is the output).
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        _check_float32(M, cfg)
    finally:
        torch.set_float32_matmul_precision(prev)


def _check_float32(M, cfg):
    packed, scale = make_weight(1031, 512, 2, None, torch.float32, seed=5)
    x = make_x((M, 512), torch.float32, seed=6)
    out = triton_linear(x, packed, scale, 2, config=cfg)
    assert out.dtype == torch.float32
    assert_close(out, oracle(x, packed, scale, 2), torch.float32, f"fp32 {cfg}")
    x16, s16 = x.half(), scale.half()
    out = triton_linear(x16, packed, s16, 2, out_dtype=torch.float32, config=cfg)
    assert out.dtype == torch.float32
    assert_close(out, oracle(x16, packed, s16, 2), torch.float16, f"fp16 -> fp32 {cfg}")


# ---------------------------------------------------------------------------------------------
# The autotuner on real hardware
# ---------------------------------------------------------------------------------------------


def _legal_kinds(M):
    kinds = set()
    if M <= L.GEMV_MAX_M:
        kinds |= {"gemv", "gemvw"}
    if M >= 2:
        kinds |= {"gemm", "gemmw"}
    return kinds


@pytest.mark.parametrize("M,path", [(1, "gemv"), (16, "small"), (300, "large")],
                         ids=["M1", "M16", "M300"])
def test_autotuner(M, path, monkeypatch):
    import triton.testing

    packed, scale = make_weight(4096, 4096, 2, None, torch.bfloat16, seed=11)
    x = make_x((M, 4096), torch.bfloat16, seed=12)
    problem = problem_of(x, packed, scale, 2)
    assert problem.word_aligned
    cands = tuning.prune(tuning.candidate_configs(problem), problem)
    assert len(cands) > 1, "nothing to tune: the candidate set is pruned to one config"

    # Every candidate the tuner benchmarks must compile and run on this GPU (the tuner itself
    # skips failing configs silently).
    real_bench = triton.testing.do_bench
    benched, failures = [], []

    def spy(fn, *args, **kwargs):
        try:  # the tuner benchmarks ``lambda: run(cfg)``: name the config in failures
            cfg = dict(zip(fn.__code__.co_freevars,
                           (c.cell_contents for c in fn.__closure__ or ()))).get("cfg")
        except (AttributeError, ValueError):
            cfg = None
        benched.append(cfg)
        try:
            return real_bench(fn, *args, **kwargs)
        except Exception as e:
            failures.append(f"{cfg}: {type(e).__name__}: {str(e)[:300]}")
            raise

    monkeypatch.setattr(triton.testing, "do_bench", spy)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = triton_linear(x, packed, scale, 2)
        torch.cuda.synchronize()
    msgs = [str(w.message) for w in rec if "triton_linear" in str(w.message)]
    assert not msgs, msgs
    assert not failures, f"{len(failures)} of {len(cands)} candidates failed on the GPU:\n" + \
        "\n".join(failures[:20])
    assert len(benched) == len(cands), (len(benched), len(cands))
    assert_close(out, oracle(x, packed, scale, 2), torch.bfloat16, f"autotuned M={M}")

    key = tuning.tuning_key(problem)
    assert key[:2] == (path, tuning.m_bucket(M))
    tuned = tuned_configs()
    assert list(tuned) == [key]
    cfg = tuned[key]
    assert cfg in cands, cfg
    assert cfg.kind in _legal_kinds(M), (M, cfg)
    cfg.check()
    if cfg.kind in ("gemm", "gemmw"):
        assert min(cfg.block_m, cfg.block_n, cfg.block_k) >= 16
    if cfg.kind == "gemvw":
        assert L.word_kernel_ok(problem, cfg)
    if cfg.kind == "gemmw":
        assert L.word_gemm_ok(problem, cfg)
    if path == "large":
        assert cfg.split_k == 1
    # a second call: cached (no benchmarking), same answer up to split-K summation order
    n = len(benched)
    again = triton_linear(x, packed, scale, 2)
    assert len(benched) == n and tuned_configs() == tuned
    assert_close(again, out.double(), torch.bfloat16, f"second call M={M}")


def test_shipped_configs_are_legal_here():
    """The tuned-config files of triton_kernels/configs that list this GPU (loaded automatically
    before the first lookup) hold only configs that are legal for their keys."""
    import glob
    import json

    if SHIPPED_CONFIGS_DIR is None or not hasattr(tuning, "load_configs"):
        pytest.skip("this version of the kernels has no tuned-config files")
    name = torch.cuda.get_device_properties(DEVICE).name
    files = []
    for path in sorted(glob.glob(os.path.join(SHIPPED_CONFIGS_DIR, "*.json"))):
        with open(path) as f:
            if name in json.load(f).get("devices", []):
                files.append(path)
    if not files:
        pytest.skip(f"no tuned-config file in {SHIPPED_CONFIGS_DIR} lists {name!r}")
    for path in files:
        assert tuning.load_configs(path) > 0, path
    entries = tuned_configs()
    assert entries
    for key, cfg in entries.items():
        k = dict(zip(tuning.KEY_FIELDS, key))
        if k["device"] != name:
            continue
        cfg.check()
        fmt = pq.get_format(k["bits"])
        problem = L.Problem(
            M=k["m_bucket"], N=k["N"], K=k["K"], bits=fmt.bits, code_bits=fmt.code_bits,
            groups=k["groups"], x_dtype=getattr(torch, k["x_dtype"].replace("torch.", "")),
            out_dtype=getattr(torch, k["out_dtype"].replace("torch.", "")),
            dot_precision=k["dot_precision"], device=name, word_aligned=k["word_aligned"])
        assert cfg.kind in _legal_kinds(k["m_bucket"]), (k, cfg)
        assert k["path"] == tuning.path_of(k["m_bucket"]), k
        if cfg.kind == "gemvw":
            assert L.word_kernel_ok(problem, cfg), (k, cfg)
        if cfg.kind == "gemmw":
            assert L.word_gemm_ok(problem, cfg), (k, cfg)
        if cfg.split_k > 1:
            assert not k["deterministic"] and k["path"] != "large", (k, cfg)


# ---------------------------------------------------------------------------------------------
# warmup, CUDA graphs, torch.compile
# ---------------------------------------------------------------------------------------------


def _quantized_mlp(seed=0):
    """nn.Sequential(Linear(1024, 2048), ReLU, Linear(2048, 1024)) in bf16 on the GPU, packed at
    2 bits (per-row scales) through torchao.quantize_."""
    pytest.importorskip("torchao")
    from torchao import quantize_

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 1024))
    model = model.to(device=DEVICE, dtype=torch.bfloat16).eval()
    quantize_(model, pq.ParetoQWeightOnlyConfig(bits=2))
    for i in (0, 2):
        assert isinstance(model[i].weight, pq.ParetoQPackedTensor), type(model[i].weight)
    return model


def _mlp_oracle(model, x):
    h = x.double()
    for mod in model:
        if isinstance(mod, nn.Linear):
            w = mod.weight
            h = reference_linear(h, w.qdata, w.scale.double(), w.bits) + mod.bias.double()
        else:
            h = mod(h)
    return h


def test_warmup_then_cuda_graphs(kernel_calls):
    from torch._dynamo.utils import counters

    model = _quantized_mlp()
    shapes = model_shapes(model, (1,))
    assert shapes == [(1, 2048, 1024, 2, None), (1, 1024, 2048, 2, None)]
    chosen = warmup(*shapes, dtype=torch.bfloat16)
    assert set(chosen) == set(shapes)
    for shape, cfg in chosen.items():
        assert isinstance(cfg, KernelConfig) and cfg.kind in ("gemv", "gemvw"), (shape, cfg)
    tuned = tuned_configs()
    assert len(tuned) == 2

    x = make_x((1, 1024), torch.bfloat16, seed=3)  # static input: the same tensor every call
    with torch.no_grad():
        eager = model(x)
    assert kernel_calls == [(1, 1024), (1, 2048)]  # the op ran the Triton kernels
    assert_close(eager, _mlp_oracle(model, x), torch.bfloat16, "eager MLP")

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    outs = []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with torch.no_grad():
            for _ in range(3):  # cudagraph trees: warm-up run, capture, replay
                torch.compiler.cudagraph_mark_step_begin()
                outs.append(compiled(x).clone())
        torch.cuda.synchronize()
    capture = [str(w.message) for w in rec if CAPTURE_WARNING in str(w.message)]
    assert not capture, capture
    assert tuned_configs() == tuned, "a compiled call tuned a shape that warmup should have tuned"
    assert counters["inductor"]["cudagraph_skips"] == 0, (
        "inductor skipped CUDA graphs (TORCH_LOGS=perf_hints says why)")
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    for i, out in enumerate(outs):
        assert_close(out, eager, torch.bfloat16, f"reduce-overhead call {i}")
    torch._dynamo.reset()


def test_capture_without_warmup_warns_and_uses_default():
    packed, scale = make_weight(2048, 1024, 2, None, torch.bfloat16, seed=21)
    x = make_x((1, 1024), torch.bfloat16, seed=22)
    problem = problem_of(x, packed, scale, 2)
    cfg = default_config(problem)
    # compile (and load) the default kernel outside the capture
    triton_linear(x, packed, scale, 2, config=cfg)
    torch.cuda.synchronize()
    clear_cache()
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with torch.cuda.graph(graph):
            out = triton_linear(x, packed, scale, 2)
    capture = [str(w.message) for w in rec if CAPTURE_WARNING in str(w.message)]
    assert len(capture) == 1, [str(w.message) for w in rec]
    assert tuned_configs() == {}, "a capture must not cache the untuned default"
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, oracle(x, packed, scale, 2), torch.bfloat16, f"captured default {cfg}")
    x.copy_(make_x((1, 1024), torch.bfloat16, seed=23))  # replay on new values of the static input
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, oracle(x, packed, scale, 2), torch.bfloat16, "replay with new input")
    del graph


def test_compile_fullgraph_default_mode(kernel_calls, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("PARETOQ_TRITON_AUTOTUNE", "0")  # default configs: this test is not about tuning
    model = _quantized_mlp(seed=1)
    x = make_x((2, 3, 1024), torch.bfloat16, seed=4)
    with torch.no_grad():
        eager = model(x)
    assert kernel_calls == [(2, 3, 1024), (2, 3, 2048)]
    assert_close(eager, _mlp_oracle(model, x), torch.bfloat16, "eager MLP")

    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, str(explained)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        first = compiled(x)
        n = len(kernel_calls)
        second = compiled(x)
    assert len(kernel_calls) - n == 2, "the compiled model must call the Triton kernels (2 layers)"
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for out in (first, second):
        assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 1024)
        assert_close(out, eager, torch.bfloat16, "compiled (default mode)")
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Bad input on CUDA
# ---------------------------------------------------------------------------------------------


def test_float64_falls_back_and_is_refused(kernel_calls):
    packed, scale = make_weight(9, 64, 2, None, torch.float32, seed=31)
    x64 = make_x((2, 64), torch.float64, seed=32)
    assert not supports(x64, packed, scale, 2)
    with pytest.raises(TypeError, match="activations of dtype float64"):
        triton_linear(x64, packed, scale, 2)
    # the op takes the reference path for fp64 on CUDA (no kernel call), in float64
    out = torch.ops.paretoq.linear(x64, packed, scale, 2.0)
    assert kernel_calls == []
    assert out.dtype == torch.float64 and out.device == x64.device
    torch.testing.assert_close(out, reference_linear(x64, packed, scale, 2))
    assert supports(x64.float(), packed, scale, 2)
    with pytest.raises(TypeError, match="scale of dtype float64"):
        triton_linear(x64.float(), packed, scale.double(), 2)


def test_bad_shapes_and_devices_on_cuda():
    packed, scale = make_weight(9, 64, 2, None, torch.bfloat16, seed=41)  # 16 bytes per row
    x = make_x((2, 64), torch.bfloat16, seed=42)
    assert supports(x, packed, scale, 2)
    # K mismatch: 72 features need 18 bytes per row, the weight holds 16
    x72 = make_x((2, 72), torch.bfloat16)
    assert not supports(x72, packed, scale, 2)
    with pytest.raises(ValueError, match=r"input has K=72 features.*\(9, 16\) holds 16 bytes"):
        triton_linear(x72, packed, scale, 2)
    # activations on the CPU, weights on the GPU: check_linear_args names both devices
    assert not supports(x.cpu(), packed, scale, 2)
    with pytest.raises(ValueError, match=r"tensors on different devices: input cpu, packed cuda"):
        triton_linear(x.cpu(), packed, scale, 2)
    with pytest.raises(ValueError, match="different devices"):
        torch.ops.paretoq.linear(x.cpu(), packed, scale, 2.0)
    # everything on the CPU without the interpreter: the kernels need CUDA tensors
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        triton_linear(x.cpu(), packed.cpu(), scale.cpu(), 2)
    # packed rows that are not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        triton_linear(x, packed.t().contiguous().t(), scale, 2)
    # a tl.dot config below 16 is refused before any compilation
    with pytest.raises(ValueError, match="BLOCK_M/N/K >= 16"):
        triton_linear(x, packed, scale, 2, config=dict(kind="gemm", block_m=8, block_n=16, block_k=16))
