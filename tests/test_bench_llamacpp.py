"""benchmarks/bench_llamacpp.py: clear errors without llama.cpp (always run), and, when
LLAMA_CPP_DIR points at a built llama.cpp, a --small end-to-end run (convert, quantize, llama-bench,
results table). No timing assertions (tiny model, shared machine)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_llamacpp.py")
TYPES = ["F16", "Q4_0", "TQ2_0"]
LLAMA_CPP_DIR = os.environ.get("LLAMA_CPP_DIR")
BUILT = bool(LLAMA_CPP_DIR) and all(
    os.access(os.path.join(LLAMA_CPP_DIR, "build", "bin", b), os.X_OK) for b in ("llama-bench", "llama-quantize"))
NEEDS_LLAMA_CPP = pytest.mark.skipif(
    not BUILT, reason="set LLAMA_CPP_DIR to a llama.cpp source dir built with `cmake -S $LLAMA_CPP_DIR -B "
    "$LLAMA_CPP_DIR/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF "
    "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF && cmake --build $LLAMA_CPP_DIR/build --target "
    "llama-bench llama-quantize -j2` (e.g. vendor/llama.cpp of the llama-cpp-python sdist)")


def _load():
    spec = importlib.util.spec_from_file_location("bench_llamacpp", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cli(*args, env_dir=None):
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_DIR"}
    if env_dir is not None:
        env["LLAMA_CPP_DIR"] = env_dir
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=120)


def test_missing_dir_one_line_error(tmp_path):
    missing = tmp_path / "no-such-llama.cpp"
    r = _cli("--small", "--llama-cpp", str(missing), "--out", str(tmp_path / "r.md"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and str(missing) in lines[0], r.stderr
    assert not (tmp_path / "r.md").exists()
    # the environment variable is the default
    r = _cli("--small", env_dir=str(missing))
    assert r.returncode == 2 and str(missing) in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("--small")
    assert r.returncode == 2 and "LLAMA_CPP_DIR" in r.stderr


def test_unbuilt_dir_says_how_to_build(tmp_path):
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    (tmp_path / "gguf-py").mkdir()
    r = _cli("--small", "--llama-cpp", str(tmp_path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "build llama.cpp first" in lines[0] and "cmake -S" in lines[0], r.stderr
    assert "llama-bench" in lines[0] and "llama-quantize" in lines[0]


def test_block_size_checked(tmp_path):
    # TQ2_0 packs rows in blocks of 256: hidden 128 is refused before llama.cpp is looked at
    r = _cli("--small", "--hidden", "128", "--types", "TQ2_0", "--llama-cpp", str(tmp_path))
    assert r.returncode == 2 and "multiple of 256" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_same_config_as_executorch_decoder():
    pytest.importorskip("transformers")
    import argparse
    spec = importlib.util.spec_from_file_location("bench_executorch_decoder",
                                                  os.path.join(ROOT, "benchmarks", "bench_executorch_decoder.py"))
    et = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(et)
    dims = dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=512)
    ours = _load()._config(argparse.Namespace(**dims, n_prompt=16, n_gen=8)).to_dict()
    theirs = et._config(argparse.Namespace(**dims, prompt_len=16, new_tokens=8)).to_dict()
    assert ours == theirs


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    tmp = tmp_path_factory.mktemp("llamacpp_bench")
    out = _load().main(["--small", "--llama-cpp", LLAMA_CPP_DIR, "--types", ",".join(TYPES), "--threads", "1",
                        "--paretoq", "2,1.58",
                        "--n-gen", "8", "--n-prompt", "16", "--reps", "1",
                        "--work-dir", str(tmp / "work"), "--out", str(tmp / "results.md")])
    yield out, tmp


@NEEDS_LLAMA_CPP
def test_files_and_tensor_types(small_run):
    out, tmp = small_run
    work = tmp / "work"
    for t in TYPES:
        assert (work / f"model-{t}.gguf").stat().st_size == out["sizes"][t]
    assert (work / "hf" / "tokenizer.model").is_file()
    # file sizes shrink with bits per weight
    assert out["sizes"]["F16"] > out["sizes"]["Q4_0"] > out["sizes"]["TQ2_0"]
    tq = out["tensor_types"]["TQ2_0"]
    assert tq["counts"].get("TQ2_0", 0) == 2 * 7  # every block linear of the 2 layers
    assert tq["emb"] != "?" and tq["head"] != "?"
    assert (out["tensor_types"]["F16"]["emb"], out["tensor_types"]["F16"]["head"]) == ("F16", "F16")
    # bits/weight of the block linears: the types' block sizes (F16 16, Q4_0 18 B / 32, TQ2_0 66 B / 256)
    for t, bits in (("F16", 16.0), ("Q4_0", 4.5), ("TQ2_0", 2.0625), ("pq2", 2.625), ("pq1.58", 1.6875)):
        assert out["tensor_types"][t]["blk_bits"] == pytest.approx(bits), t
    # our files: every block linear in its exact type, embedding and head as asked (Q8_0)
    assert out["tensor_types"]["pq1.58"]["counts"].get("TQ1_0", 0) == 2 * 7
    assert (out["tensor_types"]["pq2"]["emb"], out["tensor_types"]["pq2"]["head"]) == ("Q8_0", "Q8_0")


@NEEDS_LLAMA_CPP
def test_results_table(small_run):
    out, tmp = small_run
    text = (tmp / "results.md").read_text()
    assert text == out["text"]
    for key in ("Machine:", "Command:", "bench_llamacpp.py", "--small", "build_commit", "token_embd.weight",
                "block-linear bits/weight"):
        assert key in text, key
    lines = text.splitlines()
    header = next(l for l in lines if l.startswith("| type | file MB"))
    assert "tg8 tok/s 1T" in header and "pp16 tok/s 1T" in header
    i = lines.index(header)
    rows = [l for l in lines[i + 2:] if l.startswith("|")][:len(TYPES) + 2]
    assert [r.split("|")[1].strip() for r in rows] == TYPES + ["pq2", "pq1.58"]
    bits = []
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert len(cells) == 6, r
        float(cells[1])
        bits.append(float(cells[2]))
        assert float(cells[3]) <= float(cells[2])  # block linears alone: no embedding/head/metadata overhead
        for c in cells[4:]:
            assert re.fullmatch(r"\d+\.\d+ ± \d+\.\d+", c), c
            assert float(c.split()[0]) > 0
    assert bits[0] > bits[1] > bits[2] and bits[3] > bits[4]
