"""benchmarks/bench_cpu_decoder.py --quick: the whole flow runs in-process and writes a well-formed
results file (no timing assertions: the figures of a tiny model on a shared machine mean nothing).

Checked: the header (command, machine, versions, git, date), one decode row per variant x mode x
thread count, the ratio columns, compiled greedy tokens equal to eager for the packed variants, our
C++ kernels called (> 0 per token) by the packed variants, the DRAM bandwidth line, the int8 vs
float activations accuracy line and the PASS/MISS target lines.
"""

from __future__ import annotations

import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_cpu_decoder.py")
VARIANTS = ("fp32", "pq2", "pq2-i8")
MODES = ("eager", "compile")
HEADER = ["variant", "mode", "threads", "compile", "warm-up s", "prefill ms", "decode tok/s", "ms/token", "lm_head ms",
          "rest ms", "block MB", "rest GB/s", "DRAM GB/s", "vs fp32 eager", "vs fp32 compiled",
          "C++ calls/token", "tokens = eager"]


def _load():
    spec = importlib.util.spec_from_file_location("bench_cpu_decoder", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    pytest.importorskip("transformers")
    from paretoq_ao.export import cpu_backend
    if not cpu_backend.available():
        pytest.skip("the ParetoQ C++ CPU kernels cannot be built here")
    out = tmp_path_factory.mktemp("cpu_decoder") / "cpu-decoder.md"
    res = _load().main(["--quick", "--out", str(out)])
    with open(out) as f:
        text = f.read()
    return res, out, text


def _decode_rows(text):
    """{(variant, mode, threads): {column: cell}} of the decode table."""
    lines = text.splitlines()
    start = lines.index("| " + " | ".join(HEADER) + " |")
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(HEADER), line
        row = dict(zip(HEADER, cells))
        rows[(row["variant"], row["mode"], int(row["threads"]))] = row
    return rows


def test_results_file_header(quick):
    res, out, text = quick
    assert res["out"] == str(out) and res["text"] == text
    assert text.startswith("# PyTorch CPU decoder benchmark (")
    assert "Command: `python benchmarks/bench_cpu_decoder.py --quick --out" in text
    machine = next(line for line in text.splitlines() if line.startswith("Machine: "))
    for what in ("cores", "torch ", "torchao ", "transformers ", "git ", "date "):
        assert what in machine, (what, machine)
    assert "hidden 256, intermediate 512, 2 layers" in text and "vocab 512" in text
    assert not [p for p in os.listdir(out.parent) if p.endswith(".tmp")]  # written atomically


def test_a_row_per_variant_mode_thread(quick):
    _, _, text = quick
    rows = _decode_rows(text)
    assert set(rows) == {(v, m, 1) for v in VARIANTS for m in MODES}
    for (v, m, _), row in rows.items():
        assert float(row["decode tok/s"]) > 0 and float(row["prefill ms"]) > 0
        assert re.fullmatch(r"\d+\.\d\dx", row["vs fp32 eager"]), row
        assert re.fullmatch(r"\d+\.\d\dx", row["vs fp32 compiled"]), row
        if m == "eager":
            assert row["compile"] == "-", row
        else:
            assert row["compile"].startswith(("fullgraph", "default")), row
    assert rows[("fp32", "eager", 1)]["vs fp32 eager"] == "1.00x"
    assert rows[("fp32", "compile", 1)]["vs fp32 compiled"] == "1.00x"


def test_packed_compiled_tokens_equal_eager_and_kernels_ran(quick):
    _, _, text = quick
    rows = _decode_rows(text)
    for v, acts in (("pq2", "float"), ("pq2-i8", "int8")):
        assert rows[(v, "compile", 1)]["tokens = eager"] == "yes"
        for m in MODES:
            cell = rows[(v, m, 1)]["C++ calls/token"]
            n, mode = re.fullmatch(r"([\d.]+) \((\w+)\)", cell).groups()
            assert float(n) > 0 and mode == acts, cell
            assert float(n) == 7 * 2  # 7 block linears x 2 layers, the head stays fp32
    assert rows[("fp32", "eager", 1)]["C++ calls/token"] == "0"


def test_bandwidth_accuracy_and_target_lines(quick):
    res, _, text = quick
    bw = next(line for line in text.splitlines() if line.startswith("DRAM read bandwidth"))
    assert "read_bandwidth" in bw and "1 GiB" in bw and re.search(r"1 thread\(s\) [\d.]+ GB/s", bw), bw
    assert res["bandwidth"][1] > 0
    acc = next(line for line in text.splitlines() if line.startswith("int8 vs float activations: relative L2"))
    assert re.search(r"pq2 \d\.\d{3}e[-+]\d\d", acc), acc
    sizes = [line for line in text.splitlines() if line.startswith("| pq2 |") or line.startswith("| pq2-i8 |")]
    assert any("avx" in line or "scalar" in line or "neon" in line for line in sizes)  # kernel path named
    targets = [line for line in text.splitlines() if line.startswith("- pq2")]
    assert len(targets) == 4, targets  # pq2, pq2-i8 x eager, compile
    for line in targets:
        assert re.search(r"x fp32 eager \(target >= 3x: (PASS|MISS)\)", line), line
        assert re.search(r"x fp32 compiled \(target >= 2x: (PASS|MISS)\)", line), line


def test_llama_cpp_table_pairs_each_row_with_our_variants_of_the_same_weights():
    _load()  # puts benchmarks/ on sys.path
    import argparse

    import _llamacpp_rows as rows_mod

    a = argparse.Namespace(threads=[1, 2], modes=["eager", "compile"], reps=2, prompt_len=32, new_tokens=8)
    rows = {"pq2": dict(variant="pq2", type="Q2_K", inexact=0, max_error=0.0, size=3e6, bits=2),
            "pq2-g64": dict(variant="pq2-g64", type="Q2_K", inexact=14, max_error=0.031, size=3.5e6, bits=2)}
    timed = dict(commit="abc123", runs={(n, th): [dict(prefill_s=0.2 / th, tok_s=10.0 * th),
                                                   dict(prefill_s=0.4 / th, tok_s=30.0 * th)]
                                         for n in rows for th in (1, 2)})
    ours = lambda pre, tok: dict(prefill_s=pre, tok_s=tok)  # noqa: E731
    infos = {"pq2": dict(bytes=dict(total=2.5e6), rows={("eager", 1): ours(0.1, 40.0), ("compile", 1): ours(0.3, 20.0),
                                                         ("eager", 2): ours(0.1, 40.0), ("compile", 2): {"error": "x"}}),
             "pq2-i8": dict(bytes=dict(total=2.5e6), rows={("eager", 1): ours(0.15, 60.0)})}
    text = "\n".join(rows_mod.cpu_lines(a, rows, timed, infos))
    assert "llama.cpp abc123" in text and "pp32" in text and "tg8" in text
    # medians of the two llama.cpp runs: prefill 300 ms, 20 tok/s at 1 thread; ratios > 1 = ours faster
    assert "| pq2 | Q2_K | exact | 3.0 | 1 | 300.0 | 20.00 | pq2 eager | 2.5 | 100.0 | 40.00 | 2.00x | 3.00x |" in text
    assert "| pq2 | Q2_K | exact | 3.0 | 1 | 300.0 | 20.00 | pq2 compile | 2.5 | 300.0 | 20.00 | 1.00x | 1.00x |" in text
    assert "| pq2-i8 eager | 2.5 | 150.0 | 60.00 | 3.00x | 2.00x |" in text
    assert "| pq2 | Q2_K | exact | 3.0 | 2 | 150.0 | 40.00 | pq2 eager | 2.5 | 100.0 | 40.00 | 1.00x | 1.50x |" in text
    assert "pq2 compile | 2.5 | -" not in text  # a failed cell is left out, not invented
    assert ("| pq2-g64 | Q2_K | nearest (14 tensors, <= 3.1%) | 3.5 | 1 | 300.0 | 20.00 | "
            "(no variant of these weights in this run) |") in text


LLAMA_CPP_DIR = os.environ.get("LLAMA_CPP_DIR")


@pytest.mark.skipif(not LLAMA_CPP_DIR, reason="set LLAMA_CPP_DIR to a llama.cpp source dir with build/bin/llama-bench "
                                             "(see tests/test_bench_llamacpp.py)")
def test_quick_run_with_llama_cpp_rows(tmp_path):
    pytest.importorskip("sentencepiece")
    out = tmp_path / "r.md"
    _load().main(["--quick", "--modes", "eager", "--variants", "pq2,pq2-i8,pq2-g64", "--llama-cpp", LLAMA_CPP_DIR,
                  "--gguf", "pq2,pq2-g64=Q4_0", "--out", str(out)])
    text = out.read_text()
    assert "## llama.cpp on the same weights" in text
    lines = [l for l in text.splitlines() if l.startswith("| pq2")]
    assert any(l.startswith("| pq2 | Q2_K | exact |") and "| pq2-i8 eager |" in l for l in lines), lines
    assert any(l.startswith("| pq2-g64=Q4_0 | Q4_0 | exact |") and "| pq2-g64 eager |" in l for l in lines), lines


def test_gguf_rows_must_be_weights_the_script_builds():
    with pytest.raises(SystemExit):
        _load()._parse(["--quick", "--llama-cpp", "/x", "--gguf", "pq2-g128"])
