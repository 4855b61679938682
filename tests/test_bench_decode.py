"""benchmarks/bench_decode.py: the CPU smoke mode runs the whole flow and writes well-formed results;
without CUDA (and without --device cpu --tiny) it refuses with a clear message.

The script runs in a subprocess, as a user runs it, with CUDA hidden (CUDA_VISIBLE_DEVICES="") and
without TRITON_INTERPRET, so the packed layers take the reference path of paretoq::linear.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_decode.py")
PQ_LABELS = ["paretoq 4-bit", "paretoq 3-bit", "paretoq 2-bit", "paretoq 1.58-bit", "paretoq 1-bit"]
ROW_FIELDS = ("variant", "label", "kind", "status", "weight_bytes", "bytes_per_token", "model_size_bytes",
              "limit_tok_s", "decode_tok_s", "decode_tok_s_all", "e2e_tok_s", "ms_per_token", "prefill_ms",
              "frac_of_limit", "speedup_vs_bf16", "speedup_vs_int4", "kv_cache_bytes", "quantize_s",
              "first_generation_s", "head_weight_type", "block_weight_type", "tokens_in_vocab")
META_FIELDS = ("command", "argv", "date", "device", "device_type", "torch", "triton", "torchao", "git",
               "config", "model", "dtype", "prompt_len", "new_tokens", "reps", "warmup_reps",
               "compile_mode", "peak_tbps", "quantize_head", "limit_definition", "speedup_baselines")


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, also on a machine that has one
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _results(results_dir):
    js = glob.glob(os.path.join(results_dir, "bench_decode_*.json"))
    md = glob.glob(os.path.join(results_dir, "bench_decode_*.md"))
    assert len(js) == 1 and len(md) == 1, (js, md)
    with open(js[0]) as f:
        data = json.load(f)
    with open(md[0]) as f:
        text = f.read()
    return js[0], data, text


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode_results")
    proc = _run("--device", "cpu", "--tiny", "--results-dir", str(out), "--new-tokens", "6",
                "--prompt-len", "4", "--reps", "2", "--warmup-reps", "1")
    return proc, out


def test_cpu_smoke_exits_zero_and_writes_results(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path, data, md = _results(str(out))
    assert os.path.basename(path).startswith("bench_decode_cpu")

    meta = data["meta"]
    for k in META_FIELDS:
        assert k in meta, k
    assert meta["device_type"] == "cpu" and meta["config"] == "tiny"
    assert meta["compile_mode"] == "none" and meta["new_tokens"] == 6 and meta["prompt_len"] == 4
    assert "--device cpu --tiny" in meta["command"]
    assert meta["model"]["n_layers"] == 2

    rows = {r["label"]: r for r in data["results"]}
    assert list(rows)[:1] == ["bf16"]
    for label in ["bf16", *PQ_LABELS]:
        r = rows[label]
        assert r["status"] == "ok", r
        for k in ROW_FIELDS:
            assert k in r, (label, k)
        assert r["decode_tok_s"] > 0 and r["e2e_tok_s"] > 0 and len(r["decode_tok_s_all"]) == 2
        assert r["tokens_in_vocab"] is True
        # the weight count agrees with paretoq_ao.model_size; the limit follows from the bytes
        assert r["model_size_bytes"] == r["weight_bytes"]
        assert r["bytes_per_token"] == r["weight_bytes"] - r["embedding_bytes"]
        assert math.isclose(r["limit_tok_s"], meta["peak_tbps"] * 1e12 / r["bytes_per_token"])
        assert math.isclose(r["frac_of_limit"], r["decode_tok_s"] / r["limit_tok_s"])
        assert math.isclose(r["speedup_vs_bf16"], r["decode_tok_s"] / rows["bf16"]["decode_tok_s"])
        assert r["head_weight_type"] == "Parameter"  # head kept in bf16 without --quantize-head
    assert rows["bf16"]["speedup_vs_bf16"] == 1.0
    assert rows["bf16"]["block_weight_type"] == "Parameter"

    # packed sizes: 4 > 3 > 2 > 1.58 (5 codes per byte) > 1 bits, all below bf16
    b = [rows[l]["weight_bytes"] for l in PQ_LABELS]
    assert rows["bf16"]["weight_bytes"] > b[0] > b[1] > b[2] > b[3] > b[4]
    for l in PQ_LABELS:
        assert rows[l]["block_weight_type"] == "ParetoQPackedTensor"
        assert rows[l]["kind"] == "paretoq"

    # torchao int4 on a CPU-only torch: each format is recorded, as unavailable or measured
    int4 = [r for r in data["results"] if r["variant"] == "int4"]
    assert {r["packing_format"] for r in int4} == {"tile_packed_to_4d", "plain"}
    for r in int4:
        assert r["status"] in ("ok", "unavailable")
        if r["status"] != "ok":
            assert r["error"]
    if not any(r["status"] == "ok" for r in int4):
        assert all(r["speedup_vs_int4"] is None for r in data["results"])

    # the Markdown report: command, table and every variant
    assert "| variant | weights | bytes/token | limit tok/s | decode tok/s |" in md
    assert meta["command"] in md
    for label in rows:
        assert f"| {label} |" in md


def test_merge_with_an_earlier_run(smoke, tmp_path):
    proc, out = smoke
    assert proc.returncode == 0
    first, data0, _ = _results(str(out))
    r = _run("--device", "cpu", "--tiny", "--results-dir", str(tmp_path), "--variants", "pq2",
             "--new-tokens", "4", "--prompt-len", "4", "--reps", "1", "--warmup-reps", "0",
             "--merge", first, "--tag", "merged")
    assert r.returncode == 0, r.stderr[-3000:]
    path, data, md = _results(str(tmp_path))
    assert "_merged_" in os.path.basename(path)
    rows = {x["label"]: x for x in data["results"]}
    # this run's 2-bit row replaces the earlier one; the others come from the first file
    assert set(rows) == {x["label"] for x in data0["results"]}
    assert "source" not in rows["paretoq 2-bit"] and len(rows["paretoq 2-bit"]["decode_tok_s_all"]) == 1
    assert rows["bf16"]["source"] == os.path.basename(first)
    assert rows["paretoq 2-bit"]["speedup_vs_bf16"] == pytest.approx(
        rows["paretoq 2-bit"]["decode_tok_s"] / rows["bf16"]["decode_tok_s"])
    assert data["meta"]["merged_from"] == [os.path.basename(first)]
    assert f"(from {os.path.basename(first)})" in md


def test_without_cuda_exits_with_a_clear_message(tmp_path):
    r = _run("--results-dir", str(tmp_path), "--tiny", timeout=180)
    assert r.returncode == 2
    assert "no CUDA device is available" in r.stderr
    assert "--device cpu --tiny" in r.stderr
    assert not os.listdir(tmp_path)  # nothing was written


def test_cpu_without_tiny_is_refused(tmp_path):
    r = _run("--device", "cpu", "--results-dir", str(tmp_path), timeout=120)
    assert r.returncode == 2
    assert "--tiny" in r.stderr
    assert not os.listdir(tmp_path)
