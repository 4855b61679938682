"""benchmarks/bench_executorch_decoder.py --small: every variant is exported to a .pte, run in
executorch.runtime, checked against its eager model, and written to a well-formed table.
No timing assertions (tiny model, shared machine)."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_executorch_decoder.py")
VARIANTS = ["fp32", "8da4w", "pq2", "pq1.58", "pq2-g64"]


def _load():
    spec = importlib.util.spec_from_file_location("bench_executorch_decoder", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    pytest.importorskip("executorch")
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("decoder_bench")
    results = tmp / "results.md"
    out = _load().main(["--small", "--threads", "1", "--new-tokens", "3", "--check-tokens", "2", "--embedding", "4",
                        "--variants", ",".join(VARIANTS),
                        "--results", str(results), "--pte-dir", str(tmp / "pte")])
    yield out, results, tmp / "pte"


def test_pte_files_written(small_run):
    out, _, pte_dir = small_run
    for v in VARIANTS:
        path = pte_dir / f"decoder-{v}.pte"
        assert path.is_file() and path.stat().st_size > 0, path
        assert out["info"][v]["size"] == path.stat().st_size
    # ours goes through our op, the others do not
    assert b"paretoq::linear" in (pte_dir / "decoder-pq2.pte").read_bytes()
    assert b"paretoq::linear" not in (pte_dir / "decoder-8da4w.pte").read_bytes()
    assert (pte_dir / "lm_head-fp32.pte").is_file()
    # every decoder attends through ExecuTorch's llama::custom_sdpa (the default attention)
    for v in VARIANTS:
        assert b"llama::custom_sdpa" in (pte_dir / f"decoder-{v}.pte").read_bytes(), v
    # quantized block linears make the files smaller than fp32
    sizes = {v: out["info"][v]["size"] for v in VARIANTS}
    assert sizes["pq2"] < sizes["fp32"] and sizes["8da4w"] < sizes["fp32"]


def test_results_table(small_run):
    out, results, _ = small_run
    text = results.read_text()
    assert text == out["text"]
    for key in ("Machine:", "Command:", "bench_executorch_decoder.py", "--small", "4-bit group 32 in 8da4w and ours",
                "float32 in every variant (XNNPACK fp32 linear)"):
        assert key in text, key
    header = next(l for l in text.splitlines() if l.startswith("| variant | label"))
    for col in (".pte MB", "tok/s 1T", "speed vs 8da4w 1T", "size vs 8da4w"):
        assert col in header, col
    rows = {l.split("|")[1].strip(): l for l in text.splitlines()
            if l.startswith("| ") and ("(XNNPACK) |" in l or "(ours) |" in l)}
    assert sorted(rows) == sorted(VARIANTS)
    ncols = header.count("|")
    for v, row in rows.items():
        assert row.count("|") == ncols, row
        assert re.search(r"\| \d+\.\d+ \(\d+\.\d+-\d+\.\d+\) \|", row), row  # tok/s (range)
    assert "| 1.00x |" in rows["8da4w"] and "| 1.000x |" in rows["8da4w"]
    assert "Targets (ours vs 8da4w):" in text
    # the lm_head-alone breakdown: one row per variant
    for v in VARIANTS:
        assert any(l.startswith(f"| {v} | fp32 | ") for l in text.splitlines()), v
    for (v, th), tps in out["tok_s"].items():
        assert th == 1 and tps > 0
    # the physical limit, measured in the same run, and each variant's rest-of-step bandwidth
    assert re.search(r"DRAM read bandwidth measured in this run .*1 thread\(s\) \d+\.\d GB/s "
                     r"\(\d+\.\d / \d+\.\d\)", text)  # before the exports and before the one rep
    assert len(out["bandwidth"][1]) == 2
    for v in VARIANTS:
        assert re.search(rf"^\| {re.escape(v)} \| \d+\.\d \| \d+\.\d+ \| \d+\.\d \| \d+% \|$", text, re.M), v
    assert "ParetoQ 2-bit group 64 (ours)" in text
    assert "max_len 256, custom attention" in text


def test_etdump_profile_table(small_run):
    """The step split from the runtime's own profile: every block linear counted (7 per layer, ours
    or XNNPACK's), the head and attention found, the parts adding up to the step."""
    out, results, _ = small_run
    text = results.read_text()
    assert "Inside the runtime (ETDump profile" in text
    for v in VARIANTS:
        p = out["profile"][(v, 1)]
        assert p["linear_calls"] == 7 * 2, (v, p)  # --small: 2 layers
        # XNNPACK times its operators in whole microseconds: the tiny config's block linears (hidden
        # 128) may all read 0 on a fast CPU; our operators are timed by the runtime itself
        assert p["linears"] > 0 if v.startswith("pq") else p["linears"] >= 0, (v, p)
        assert p["head"] > 0 and p["attention"] > 0, (v, p)
        assert abs(p["linears"] + p["head"] + p["attention"] + p["other"] - p["step"]) < 1e-9
        assert p["other"] >= 0, (v, p)
        blk = r"\d+\.\d \| \d+%" if v.startswith("pq") else r"(\d+\.\d \| \d+%|- \| -)"
        assert re.search(rf"^\| {re.escape(v)} \| 1 \| (\d+\.\d+ \| ){{5}}14 \| {blk} \| \d+\.\d \| \d+% \|$",
                         text, re.M), v


def test_etdump_split_of_known_events():
    """split_events against hand-made events: the last fully-connected op is the head, earlier ones
    and paretoq ops are block linears, the first ``skip`` executions are left out."""
    import sys
    from types import SimpleNamespace as NS

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import _etdump_profile as ep
    finally:
        sys.path.pop(0)

    def ev(name, *ms):
        return NS(name=name, perf_data=NS(raw=list(ms)))

    events = [ev("Method::execute", 100.0, 20.0, 22.0), ev("native_call_embedding_4bit.dtype_out", 9.0, 1.0, 1.0),
              ev("paretoq::linear_8da_b16.out", 50.0, 4.0, 6.0), ev("Fully Connected (NC, F32) GEMM #1", 9.0, 2.0, 2.0),
              ev("llama::custom_sdpa.out", 9.0, 1.5, 0.5), ev("llama::update_cache.out", 9.0, 0.5, 0.5),
              ev("DELEGATE_CALL", 9.0, 9.0, 9.0), ev("Fully Connected (NC, QDU8, F32, QB4W) GEMM #1", 9.0, 3.0, 5.0)]
    got = ep.split_events(events, skip=1)
    assert got == dict(step=21.0, linears=7.0, linear_calls=2, head=4.0, attention=1.5, other=8.5)
    with pytest.raises(RuntimeError, match="Method::execute"):
        ep.split_events(events[1:], skip=0)


def test_max_len_shorter_than_the_run_is_refused():
    with pytest.raises(SystemExit):
        _load()._parse(["--small", "--max-len", "4", "--prompt-len", "3", "--new-tokens", "4"])


def test_correctness_checks(small_run):
    out, results, _ = small_run
    info = out["info"]
    # fp32 XNNPACK and ours with fp32 activations equal their eager models to float rounding
    assert info["fp32"]["checks"]["xnnpack"]["all"] < 1e-4
    for v in ("pq2", "pq1.58", "pq2-g64"):
        assert info[v]["checks"]["fp32 acts"]["all"] < 1e-4
        assert info[v]["checks"]["int8 acts"]["rel"] < 0.1
    assert info["8da4w"]["checks"]["xnnpack"]["rel"] < 0.1
    text = results.read_text()
    for row in ("| fp32 | xnnpack |", "| 8da4w | xnnpack |", "| pq2 | fp32 acts |", "| pq2 | int8 acts |",
                "| pq1.58 | fp32 acts |", "| pq1.58 | int8 acts |"):
        assert row in text, row


LLAMA_CPP_DIR = os.environ.get("LLAMA_CPP_DIR")


@pytest.mark.skipif(not LLAMA_CPP_DIR, reason="set LLAMA_CPP_DIR to a llama.cpp source dir with build/bin/llama-bench "
                                             "(see tests/test_bench_llamacpp.py)")
def test_llama_cpp_rows_side_by_side(tmp_path):
    pytest.importorskip("executorch")
    pytest.importorskip("sentencepiece")
    results = tmp_path / "r.md"
    out = _load().main(["--small", "--hidden", "256", "--intermediate", "512", "--threads", "1", "--new-tokens", "3",
                        "--check-tokens", "2", "--variants", "pq2,pq1.58,pq2-g64", "--llama-cpp", LLAMA_CPP_DIR,
                        "--gguf", "pq2,pq1.58,pq1.58=TQ2_0,pq2-g64,pq2-g64=Q4_0", "--results", str(results),
                        "--pte-dir", str(tmp_path / "pte")])
    text = results.read_text()
    assert "llama.cpp on the same weights" in text
    rows = {l.split("|")[1].strip(): l for l in text.splitlines() if l.startswith("| pq") and ".gguf" not in l
            and "GGUF" not in l and l.count("|") == 9}
    assert set(rows) == {"pq2", "pq1.58", "pq1.58=TQ2_0", "pq2-g64", "pq2-g64=Q4_0"}, rows
    assert "| Q2_K | exact |" in rows["pq2"] and "| TQ1_0 | exact |" in rows["pq1.58"]
    assert "| TQ2_0 | exact |" in rows["pq1.58=TQ2_0"] and "| Q4_0 | exact |" in rows["pq2-g64=Q4_0"]
    assert re.search(r"\| Q2_K \| nearest \(14 tensors, <= \d+\.\d%\) \|", rows["pq2-g64"]), rows["pq2-g64"]
    for row in rows.values():
        assert re.search(r"\| \d+\.\d+x \| >= 1\.3x and no larger: (met|NOT met) \|$", row), row
    assert (tmp_path / "pte" / "decoder-pq1.58-TQ2_0.gguf").is_file()
    assert out["step_s"][("llama:pq2", 1)] > 0 and out["step_s"][("llama:pq2-g64=Q4_0", 1)] > 0


def test_llama_cpp_row_specs():
    bench = _load()
    rows = bench._llamacpp_rows.parse_specs("pq2, pq1.58=tq2_0, PQ2-G64, pq4-g32=Q8_0", [], pytest.fail)
    assert rows == [("pq2", "pq2", 2, None), ("pq1.58=tq2_0", "pq1.58", 1.58, "TQ2_0"),
                    ("PQ2-G64", "pq2-g64", 2, None), ("pq4-g32=Q8_0", "pq4-g32", 4, "Q8_0")]
    assert [r[0] for r in bench._llamacpp_rows.parse_specs("", ["fp32", "pq2", "pq3-g64", "8da4w"], pytest.fail)] \
        == ["pq2", "pq3-g64"]  # default: a row for every pq variant

    def fail(msg):
        raise ValueError(msg)

    with pytest.raises(ValueError, match=r"--gguf: 'pq5' is not pq<bits>\[-g<group>\]\[=TYPE\]"):
        bench._llamacpp_rows.parse_specs("pq5", [], fail)
