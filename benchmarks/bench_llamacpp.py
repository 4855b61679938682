"""llama.cpp as the side-by-side CPU baseline for our decoder benchmarks: same model shape, threads.

The model is the random-weight ``LlamaForCausalLM`` of ``bench_executorch_decoder.py`` (same
``LlamaConfig`` fields from ``benchmarks/_decoder.py``, same ``torch.manual_seed(seed)`` before
construction, so the same weights for the same flags; 16 layers by default, as in the llama.cpp table
of ``shared/design/ANCHORS.md``). It is saved with ``save_pretrained`` in float16 next to a
SentencePiece tokenizer trained offline on the Python standard library's docstrings
(``tokenizer.model``, BPE, byte fallback, exactly ``--vocab`` pieces; ``tokenizer_config.json`` says
``LlamaTokenizer``), then converted and quantized by llama.cpp's own tools::

    PYTHONPATH=<dir>/gguf-py python <dir>/convert_hf_to_gguf.py hf --outtype f16 --outfile model-F16.gguf
    <dir>/build/bin/llama-quantize model-F16.gguf model-<TYPE>.gguf <TYPE>      # each type but F16
    <dir>/build/bin/llama-bench -m model-<TYPE>.gguf -t <threads> -n <n-gen> -p <n-prompt> -r 1 -o json

``llama-bench`` is called once per (rep, threads, type), interleaved as
``for rep: for threads: for type`` so that load from other processes spreads over all types
(llama-bench numbers swing 2-8x when another process uses a core); each call runs llama-bench's own
warm-up, then one pp<n-prompt> and one tg<n-gen> run. The table gives the mean +- standard deviation
over reps of llama-bench's tokens/s. Bits/weight = file bytes * 8 / parameter count (everything:
embedding, head, norms, GGUF metadata). The tensor types llama-quantize actually chose for the token
embedding (``token_embd.weight``) and the output head (``output.weight``) are read back from each
file with llama.cpp's vendored ``gguf`` package (``gguf.GGUFReader``) and written too.

    python benchmarks/bench_llamacpp.py --llama-cpp /path/to/llama.cpp         # full matrix
    python benchmarks/bench_llamacpp.py --small --types F16,Q4_0,TQ2_0 --threads 1   # tiny, for tests

``--small`` is hidden 256, intermediate 512, 2 layers, 4/2 heads, vocab 512: K-quants (Q2_K ...) and
TQ1_0/TQ2_0 pack rows in blocks of 256 weights, so hidden and intermediate must be multiples of 256
(the script refuses other sizes for those types rather than let llama-quantize fall back silently).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import _meta  # noqa: E402
from _decoder import add_shape_args, fill_shape, llama_config  # noqa: E402

PROG = "bench_llamacpp.py"
SMALL = dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=512)
DEFAULT_TYPES = "F16,Q8_0,Q4_0,Q2_K,TQ2_0,TQ1_0"
# weights per block of each llama-quantize type accepted here (rows must be a multiple of it)
BLOCK = {"F16": 1, "BF16": 1, "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32,
         "Q2_K": 256, "Q3_K_S": 256, "Q3_K_M": 256, "Q3_K_L": 256, "Q4_K_S": 256, "Q4_K_M": 256,
         "Q5_K_S": 256, "Q5_K_M": 256, "Q6_K": 256, "TQ1_0": 256, "TQ2_0": 256}
BUILD_HINT = ("cmake -S {d} -B {d}/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF "
              "-DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF && "
              "cmake --build {d}/build --target llama-bench llama-quantize -j2")


def _fail(msg):
    """One-line error on stderr, exit status 2 (like argparse)."""
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _ints(s):
    return [int(x) for x in s.split(",") if x.strip()]


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"),
                    help="llama.cpp source dir (convert_hf_to_gguf.py, gguf-py, build/bin/); default $LLAMA_CPP_DIR")
    ap.add_argument("--small", action="store_true", help=f"tiny config {SMALL}, for tests")
    add_shape_args(ap, SMALL, "--small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--types", default=DEFAULT_TYPES, help=f"comma list of {', '.join(BLOCK)}")
    ap.add_argument("--paretoq", default="", help="comma list of ParetoQ bit widths (4, 3, 2, 1.58, 1): the same "
                    "weights, ParetoQ RTN, written by paretoq_ao.export.gguf (rows pq<bits>)")
    ap.add_argument("--pq-embedding-type", default="Q8_0", help="token embedding of the pq rows (F32/F16/BF16/Q8_0)")
    ap.add_argument("--pq-head-type", default="Q8_0", help="output head of the pq rows (F32/F16/BF16/Q8_0)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--n-gen", type=int, default=64, help="tokens generated per tg run (0: no tg)")
    ap.add_argument("--n-prompt", type=int, default=128, help="prompt tokens per pp run (0: no pp)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved llama-bench calls per (threads, type)")
    ap.add_argument("--work-dir", default=None, help="model files go here (default: a temp dir, removed at the end)")
    ap.add_argument("--out", default=None, help="results markdown (default benchmarks/results/llamacpp-<date>.md)")
    a = ap.parse_args(argv)
    fill_shape(a, SMALL, a.small)
    a.types = [t.strip().upper() for t in a.types.split(",") if t.strip()]
    a.pq_bits = [_bits(b) for b in a.paretoq.split(",") if b.strip()]
    a.rows = a.types + [f"pq{b}" for b in a.pq_bits]  # every file benchmarked, in table order
    a.threads = _ints(a.threads)
    bad = [t for t in a.types if t not in BLOCK]
    if bad:
        _fail(f"unknown --types {bad}; choose from {', '.join(BLOCK)}")
    for t in a.types:
        for k in ("hidden", "intermediate"):
            if getattr(a, k) % BLOCK[t]:
                _fail(f"--{k} {getattr(a, k)} is not a multiple of {BLOCK[t]}, the block size of {t}")
    if not a.threads or min(a.threads) < 1 or a.reps < 1 or (a.n_gen <= 0 and a.n_prompt <= 0):
        _fail("need --threads >= 1, --reps >= 1 and at least one of --n-gen / --n-prompt > 0")
    return a


def _bits(s):
    try:
        v = float(s)
    except ValueError:
        _fail(f"--paretoq: {s!r} is not a bit width (4, 3, 2, 1.58, 1)")
    if v not in (4, 3, 2, 1.58, 1):
        _fail(f"--paretoq: {s!r} is not one of 4, 3, 2, 1.58, 1")
    return int(v) if v.is_integer() else v


def _llama_cpp_paths(d):
    """The llama.cpp files this script uses, or a one-line error naming what is missing."""
    if not d:
        _fail("no llama.cpp dir: pass --llama-cpp DIR or set LLAMA_CPP_DIR")
    d = os.path.abspath(d)
    if not os.path.isdir(d):
        _fail(f"llama.cpp dir {d} does not exist (--llama-cpp / LLAMA_CPP_DIR)")
    p = dict(dir=d, convert=os.path.join(d, "convert_hf_to_gguf.py"), gguf_py=os.path.join(d, "gguf-py"),
             bench=os.path.join(d, "build", "bin", "llama-bench"),
             quantize=os.path.join(d, "build", "bin", "llama-quantize"))
    if not (os.path.isfile(p["convert"]) and os.path.isdir(p["gguf_py"])):
        _fail(f"{d} is not a llama.cpp source dir (no convert_hf_to_gguf.py / gguf-py)")
    missing = [os.path.basename(p[k]) for k in ("bench", "quantize") if not os.access(p[k], os.X_OK)]
    if missing:
        _fail(f"no {' / '.join(missing)} in {d}/build/bin: build llama.cpp first: {BUILD_HINT.format(d=d)}")
    return p


def _config(a):
    """The LlamaConfig of bench_executorch_decoder.py for the same flags (benchmarks/_decoder.py)."""
    return llama_config(a, a.n_prompt + a.n_gen)


def _corpus():
    """ASCII lines of the Python standard library's docstrings (the tokenizer's training text)."""
    lib = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "site-packages", "idlelib", "__pycache__"}
    lines = []
    for root, dirs, files in os.walk(lib):
        dirs[:] = sorted(x for x in dirs if x not in skip)
        for f in sorted(x for x in files if x.endswith(".py")):
            try:
                with open(os.path.join(root, f), encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
            except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node) or ""
                    lines += [x for x in doc.splitlines() if x.strip() and x.isascii()]
    return lines


def _write_tokenizer(hf_dir, vocab):
    """A SentencePiece ``tokenizer.model`` with exactly ``vocab`` pieces (Llama ids: unk 0, bos 1,
    eos 2) and a LlamaTokenizer config, so convert_hf_to_gguf.py takes the folder."""
    import sentencepiece as spm
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_corpus()), model_writer=buf, vocab_size=vocab, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=1, minloglevel=2)
    except RuntimeError as e:
        _fail(f"SentencePiece could not train a {vocab}-piece tokenizer: {str(e).splitlines()[-1]}")
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    if sp.vocab_size() != vocab:
        _fail(f"SentencePiece made {sp.vocab_size()} pieces, not --vocab {vocab}")
    with open(os.path.join(hf_dir, "tokenizer.model"), "wb") as f:
        f.write(buf.getvalue())
    special = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    cfg = dict(special, tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False,
               model_max_length=4096, legacy=False)
    for name, obj in (("tokenizer_config.json", cfg), ("special_tokens_map.json", special)):
        with open(os.path.join(hf_dir, name), "w") as f:
            json.dump(obj, f, indent=2)


def _write_hf_model(a, hf_dir):
    """The random-weight model (seed ``a.seed``, built in float32 like bench_executorch_decoder,
    saved in float16) and its tokenizer; returns the parameter count."""
    import torch
    from transformers import LlamaForCausalLM
    torch.manual_seed(a.seed)
    model = LlamaForCausalLM(_config(a)).eval()
    n_params = sum(p.numel() for p in model.parameters())
    model.to(torch.float16).save_pretrained(hf_dir)
    del model
    _write_tokenizer(hf_dir, a.vocab)
    return n_params


def _run(cmd, log, env=None):
    """Run ``cmd``, output to the file ``log``; a one-line error if it fails. Returns stdout."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    with open(log, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
    if r.returncode != 0:
        tail = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
        _fail(f"{os.path.basename(cmd[1] if cmd[0] == sys.executable else cmd[0])} exited with "
              f"{r.returncode}: {tail} (log: {log})")
    print(f"  {time.perf_counter() - t0:.1f} s: {' '.join(cmd)}", flush=True)
    return r.stdout


def _make_gguf(p, a, work, n_params):
    """Convert (F16) and quantize (every other type); returns {type: path}."""
    hf_dir = os.path.join(work, "hf")
    f16 = os.path.join(work, "model-F16.gguf")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(x for x in (p["gguf_py"], os.environ.get("PYTHONPATH")) if x))
    _run([sys.executable, p["convert"], hf_dir, "--outtype", "f16", "--outfile", f16],
         os.path.join(work, "convert.log"), env)
    files = {"F16": f16}
    for t in a.types:
        if t != "F16":
            files[t] = os.path.join(work, f"model-{t}.gguf")
            _run([p["quantize"], f16, files[t], t], os.path.join(work, f"quantize-{t}.log"))
    for t in a.types:
        print(f"  {t}: {os.path.getsize(files[t]) / 1e6:.1f} MB, "
              f"{os.path.getsize(files[t]) * 8 / n_params:.3f} bits/weight", flush=True)
    return files


def _make_paretoq_gguf(a, work):
    """The pq<bits> files: the saved model (float16 weights, as llama.cpp's converter read them) in
    float32, block linears quantized by ParetoQ RTN (per-row scales), exported by export_gguf."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from paretoq_ao import ParetoQWeightOnlyConfig, quantize
    from paretoq_ao.export.gguf import export_gguf

    hf_dir, files = os.path.join(work, "hf"), {}
    tok = AutoTokenizer.from_pretrained(hf_dir)
    for bits in a.pq_bits:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        quantize(model, ParetoQWeightOnlyConfig(bits=bits))
        files[f"pq{bits}"] = path = os.path.join(work, f"model-pq{bits}.gguf")
        rep = export_gguf(model, tok, path, embedding_type=a.pq_embedding_type, head_type=a.pq_head_type)
        del model
        kinds = sorted({r["type"] for r in rep["tensors"].values()})
        print(f"  pq{bits}: {rep['bytes'] / 1e6:.1f} MB ({', '.join(kinds)}; {len(rep['inexact'])} inexact), "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    return files


def _tensor_types(p, path):
    """Tensor types of a GGUF file, read with the vendored gguf: dict(emb=type of token_embd.weight,
    head=type of output.weight, counts={type: n}, blk_bits=bits/weight of the block linears
    (``blk.*`` tensors that are not F32: q/k/v/o/gate/up/down))."""
    if p["gguf_py"] not in sys.path:
        sys.path.insert(0, p["gguf_py"])
    import gguf
    counts, named, blk_bytes, blk_n = {}, {}, 0, 0
    for t in gguf.GGUFReader(path).tensors:
        name = t.tensor_type.name
        counts[name] = counts.get(name, 0) + 1
        named[t.name] = name
        if t.name.startswith("blk.") and name != "F32":
            blk_bytes, blk_n = blk_bytes + int(t.n_bytes), blk_n + int(t.n_elements)
    return dict(emb=named.get("token_embd.weight", "?"), head=named.get("output.weight", "tied"), counts=counts,
                blk_bits=blk_bytes * 8 / blk_n if blk_n else float("nan"))


def _bench_once(p, path, threads, a, log):
    """One llama-bench call (-r 1): {"pp": tok/s, "tg": tok/s} plus llama-bench's build fields."""
    cmd = [p["bench"], "-m", path, "-t", str(threads), "-n", str(a.n_gen), "-p", str(a.n_prompt),
           "-r", "1", "-o", "json"]
    out = _run(cmd, log)
    start, end = out.find("["), out.rfind("]")
    try:
        rows = json.loads(out[start:end + 1]) if start >= 0 else None
    except json.JSONDecodeError:
        rows = None
    if not isinstance(rows, list) or not rows:
        _fail(f"could not parse llama-bench's JSON output (log: {log})")
    res = {k: rows[0].get(k) for k in ("build_commit", "build_number", "cpu_info", "backends", "model_n_params")}
    for r in rows:
        if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0:
            res["pp"] = float(r["avg_ts"])
        elif r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            res["tg"] = float(r["avg_ts"])
    return res


def _bench_all(p, a, files, work):
    """Interleaved llama-bench calls (for rep: for threads: for type): {(type, threads): [results]}."""
    runs = {(t, th): [] for t in a.rows for th in a.threads}
    for rep in range(a.reps):
        for th in a.threads:
            for t in a.rows:
                log = os.path.join(work, f"bench-{t}-t{th}-r{rep}.log")
                r = _bench_once(p, files[t], th, a, log)
                runs[(t, th)].append(r)
                print(f"rep {rep + 1}/{a.reps} threads {th} {t}: "
                      + ", ".join(f"{k} {r[k]:.2f} tok/s" for k in ("pp", "tg") if k in r), flush=True)
    return runs


def _ms(vals):
    """'mean +- std' of a list of tok/s (std 0 for one value)."""
    if not vals:
        return "-"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.2f}"


def _report(a, info, command):
    """The results markdown (see the module docstring)."""
    b = next(iter(info["runs"].values()))[0]
    tg, pp = f"tg{a.n_gen}", f"pp{a.n_prompt}"
    lines = [f"# llama.cpp CPU baseline ({info['date']})", "",
             f"Machine: {_meta.cpu_model()}, {os.cpu_count()} cores, {platform.platform()}; load average before timing "
             f"{info['load']}; llama-bench cpu_info: {b.get('cpu_info')}",
             f"llama.cpp: {info['dir']}, build_commit {b.get('build_commit')}, build_number {b.get('build_number')}, "
             f"backends {b.get('backends')}; this repo: {_meta.git_commit()}",
             f"Command: `{command}`", "",
             f"Model: LlamaForCausalLM (random weights, torch.manual_seed({a.seed}), as bench_executorch_decoder.py), "
             f"hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} layers, {a.heads} heads / {a.kv_heads} KV "
             f"heads, vocab {a.vocab}, untied; {info['n_params'] / 1e6:.1f} M parameters (llama-bench: "
             f"{(b.get('model_n_params') or 0) / 1e6:.1f} M). Saved in float16, converted by convert_hf_to_gguf.py "
             "--outtype f16 (F16), then llama-quantize <type>."
             + (f" pq<bits>: the same float16 weights in float32, block linears quantized by ParetoQ RTN (per-row "
                f"scales, paretoq_ao.quantize), written by paretoq_ao.export.gguf (embedding {a.pq_embedding_type}, "
                f"head {a.pq_head_type})." if a.pq_bits else ""),
             f"Timing: llama-bench -r 1 called {a.reps}x per (threads, type), interleaved (for rep: for threads: "
             f"for type); " + ", ".join(([f"{tg} = generate {a.n_gen} tokens"] if a.n_gen > 0 else [])
                                        + ([f"{pp} = a {a.n_prompt}-token prompt"] if a.n_prompt > 0 else []))
             + "; tok/s mean ± std over the calls (std 0 for one call). Bits/weight = file bytes * 8 / parameter "
             "count; block-linear bits/weight = bytes of the blk.* weight tensors (q/k/v/o/gate/up/down) * 8 / "
             "their weights.", ""]
    cols = [c for th in a.threads for c in ((f"{tg} tok/s {th}T",) if a.n_gen > 0 else ())
            + ((f"{pp} tok/s {th}T",) if a.n_prompt > 0 else ())]
    lines += ["| type | file MB | bits/weight | block-linear bits/weight | " + " | ".join(cols) + " |",
              "|---|---|---|---|" + "---|" * len(cols)]
    for t in a.rows:
        size = os.path.getsize(info["files"][t])
        cells = [t, f"{size / 1e6:.1f}", f"{size * 8 / info['n_params']:.3f}",
                 f"{info['tensor_types'][t]['blk_bits']:.3f}"]
        for th in a.threads:
            rs = info["runs"][(t, th)]
            cells += [_ms([r["tg"] for r in rs if "tg" in r])] if a.n_gen > 0 else []
            cells += [_ms([r["pp"] for r in rs if "pp" in r])] if a.n_prompt > 0 else []
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Tensor types in each file (read back with gguf.GGUFReader): token embedding, output head, "
              "and the count of every type over all tensors:", "",
              "| type | token_embd.weight | output.weight | all tensors |", "|---|---|---|---|"]
    for t in a.rows:
        d = info["tensor_types"][t]
        lines.append(f"| {t} | {d['emb']} | {d['head']} | "
                     + ", ".join(f"{k} x{v}" for k, v in sorted(d["counts"].items(), key=lambda kv: -kv[1])) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    a = _parse(argv)
    p = _llama_cpp_paths(a.llama_cpp)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    command = " ".join([".venv/bin/python", "benchmarks/bench_llamacpp.py"] + argv_used)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    out = a.out or _meta.results_path(ROOT, "llamacpp", date)
    work = os.path.abspath(a.work_dir or tempfile.mkdtemp(prefix="llamacpp-bench-"))
    os.makedirs(os.path.join(work, "hf"), exist_ok=True)
    try:
        t0 = time.perf_counter()
        n_params = _write_hf_model(a, os.path.join(work, "hf"))
        print(f"HF model + tokenizer: {n_params / 1e6:.1f} M parameters, {time.perf_counter() - t0:.1f} s "
              f"({work}/hf)", flush=True)
        files = _make_gguf(p, a, work, n_params)
        files.update(_make_paretoq_gguf(a, work))
        types = {t: _tensor_types(p, files[t]) for t in a.rows}
        for t, d in types.items():
            print(f"  {t}: token_embd {d['emb']}, output {d['head']}, block linears {d['blk_bits']:.3f} "
                  f"bits/weight; {d['counts']}", flush=True)
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        info = dict(date=date, dir=p["dir"], n_params=n_params, files=files, tensor_types=types, load=load,
                    runs=_bench_all(p, a, files, work))
        text = _report(a, info, command)
        print(text)
        _meta.write_text(out, text)
        print("written", out, "; work dir", work if a.work_dir else "(temp, removed)")
        return dict(out=out, text=text, n_params=n_params, tensor_types=types, runs=info["runs"],
                    sizes={t: os.path.getsize(files[t]) for t in a.rows})
    finally:
        if a.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
