"""A whole Llama-style decoder inside the ExecuTorch runtime: decode tokens/s and .pte size.

Same architecture and the same random weights for every variant (a transformers LlamaForCausalLM
built from a LlamaConfig), wrapped in ``paretoq_ao.export.llama.LlamaKVStep`` (static KV cache,
one token per call) and exported to ``.pte``:

* ``fp32``   - float32, everything lowered to XNNPACK;
* ``8da4w``  - torchao ``Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
  weight_granularity=PerGroup(32))`` on every block linear, lowered to XNNPACK;
* ``pq2`` / ``pq1.58`` - ``ParetoQWeightOnlyConfig(bits=2 / 1.58)`` on every block linear, exported
  with ``paretoq_ao.export.export_executorch`` (our C++ kernels, int8 activations; the rest to
  XNNPACK).

In every variant the token embedding and the ``lm_head`` stay float32 (embedding: portable
``aten::embedding``; lm_head: XNNPACK fp32 linear), so the size comparison differs only in the block
linears. Because those two fp32 tables (2 x vocab x hidden x 4 bytes) are a fixed part of every
file, sizes are reported both for the whole file and without them.

    python benchmarks/bench_executorch_decoder.py                    # hidden 2048, 8 layers, vocab 32000
    python benchmarks/bench_executorch_decoder.py --small --results /tmp/r.md   # tiny, for tests

Decode timing: a prompt of ``--prompt-len`` tokens is fed one token per call (KV cache), then
``--new-tokens`` tokens are generated greedily; each generated step is timed around
``method.execute`` and the median step time gives tokens/s. Timing runs are interleaved
(for rep: for threads: for variant) so that load from other processes on the machine spreads over
all variants; the table reports the median over reps of each rep's median (and the spread).

Correctness: for each variant the eager model (``LlamaKVStep`` on the same quantized model) and
the ``.pte`` are fed the same tokens (the eager model's greedy continuation); the max abs
difference of the logits that produce the first generated token (and over the first
``--check-tokens`` generated tokens) is printed and written. For ParetoQ the ``.pte`` is checked with
fp32 activations (should equal eager to float rounding) and with the int8 activations used for
timing (the eager op uses float activations, so that difference is the int8 activation error).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_VARIANTS = ("fp32", "8da4w", "pq2", "pq1.58")
LABELS = {"fp32": "fp32 (XNNPACK)", "8da4w": "torchao 8da4w g32 (XNNPACK)",
          "pq2": "ParetoQ 2-bit (ours)", "pq1.58": "ParetoQ ternary 1.58-bit (ours)"}

FULL = dict(hidden=2048, intermediate=5632, layers=8, heads=32, kv_heads=4, vocab=32000)
SMALL = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512)


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true",
                    help="tiny config (hidden 128, 2 layers, vocab 512) and few tokens, for tests")
    for k in FULL:
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None, help=f"default {FULL[k]} ({SMALL[k]} with --small)")
    ap.add_argument("--variants", default=",".join(ALL_VARIANTS), help=f"comma list of {ALL_VARIANTS}")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 8 (3 with --small)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 32 (4 with --small)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved timing repeats, default 5 (1 with --small)")
    ap.add_argument("--check-tokens", type=int, default=4, help="generated tokens compared with eager")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pte-dir", default=None, help="where the .pte files go (default: a temp dir, kept)")
    ap.add_argument("--results", default=None,
                    help="markdown output (default benchmarks/results/executorch-decoder-<date>.md)")
    a = ap.parse_args(argv)
    base = SMALL if a.small else FULL
    for k in FULL:
        if getattr(a, k) is None:
            setattr(a, k, base[k])
    if a.prompt_len is None:
        a.prompt_len = 3 if a.small else 8
    if a.new_tokens is None:
        a.new_tokens = 4 if a.small else 32
    if a.reps is None:
        a.reps = 1 if a.small else 5
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in a.variants if v not in ALL_VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {ALL_VARIANTS}")
    a.threads = [int(t) for t in a.threads.split(",")]
    a.check_tokens = max(1, min(a.check_tokens, a.new_tokens))
    return a


def _config(a):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads,
                       num_key_value_heads=a.kv_heads, max_position_embeddings=max(128, a.prompt_len + a.new_tokens),
                       tie_word_embeddings=False)


def _block_linear(mod, fqn):
    """Every nn.Linear inside the decoder blocks (q/k/v/o, gate/up/down); not lm_head."""
    return isinstance(mod, nn.Linear) and ".layers." in f".{fqn}."


def _build_model(cfg, state, variant):
    """A fresh LlamaForCausalLM with ``state`` loaded, quantized for ``variant``."""
    from transformers import LlamaForCausalLM
    from torchao import quantize_
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(state)
    model.float()
    if variant == "8da4w":
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup
        quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                               weight_granularity=PerGroup(32)),
                  filter_fn=_block_linear)
    elif variant.startswith("pq"):
        from paretoq_ao import ParetoQWeightOnlyConfig
        bits = 1.58 if variant == "pq1.58" else int(variant[2:])
        quantize_(model, ParetoQWeightOnlyConfig(bits=bits), filter_fn=_block_linear)
    return model


def _export_xnnpack(step, example, path):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    with torch.no_grad():
        ep = torch.export.export(step, example, strict=False)
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    data = edge.to_executorch().buffer
    with open(path, "wb") as f:
        f.write(data)


def _eager_reference(step, prompt, n_check):
    """Greedy continuation of ``prompt`` by the eager step: (tokens fed, logits [n_check, vocab])."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for i in range(len(prompt) + n_check - 1):
            lg = step(torch.tensor([[seq[i]]]), torch.tensor([i]))[0, -1]
            if i >= len(prompt) - 1:
                out.append(lg.clone())
                seq.append(int(lg.argmax()))
    return seq, torch.stack(out)


def _pte_logits(method, seq, prompt_len, n_check):
    """Logits of the .pte fed ``seq`` (teacher forcing), at the steps that predict new tokens."""
    out = []
    for i in range(prompt_len + n_check - 1):
        lg = method.execute([torch.tensor([[seq[i]]]), torch.tensor([i])])[0][0, -1]
        if i >= prompt_len - 1:
            out.append(lg.clone())
    return torch.stack(out)


def _diff(got, ref):
    return dict(first=(got[0] - ref[0]).abs().max().item(), all=(got - ref).abs().max().item(),
                rel=((got - ref).norm() / ref.norm()).item(),
                agree=int((got.argmax(-1) == ref.argmax(-1)).sum()), n=len(ref))


def _decode(method, prompt, new_tokens):
    """Prompt token by token, then greedy generation; returns the times (s) of the ``new_tokens``
    steps that produce a generated token."""
    ids = [torch.tensor([[t]]) for t in prompt]
    times, tok = [], None
    for i in range(len(prompt) + new_tokens - 1):
        x = ids[i] if i < len(prompt) else torch.tensor([[tok]])
        pos = torch.tensor([i])
        t0 = time.perf_counter()
        lg = method.execute([x, pos])[0]
        dt = time.perf_counter() - t0
        if i >= len(prompt) - 1:  # this step produces a generated token (the last prompt step: the first)
            tok = int(lg[0, -1].argmax())
            times.append(dt)
    return times


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _fmt_mb(n):
    return f"{n / 1e6:.1f}"


def main(argv=None):
    a = _parse(argv)
    from transformers import LlamaForCausalLM
    import executorch.runtime  # noqa: F401
    import paretoq_ao.export as pe
    from paretoq_ao.export.llama import LlamaKVStep

    argv_used = sys.argv[1:] if argv is None else list(argv)
    command = " ".join([".venv/bin/python", "benchmarks/bench_executorch_decoder.py"] + argv_used)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    pte_dir = a.pte_dir or tempfile.mkdtemp(prefix="pte-decoder-")
    os.makedirs(pte_dir, exist_ok=True)
    results = a.results or os.path.join(ROOT, "benchmarks", "results", f"executorch-decoder-{date[:10]}.md")

    pe.load_kernels()
    pe.set_activation_mode("int8")
    torch.manual_seed(a.seed)
    cfg = _config(a)
    state = LlamaForCausalLM(cfg).eval().float().state_dict()
    state = {k: v.clone() for k, v in state.items()}
    n_block = sum(v.numel() for k, v in state.items() if ".layers." in k and k.endswith("proj.weight"))
    emb_head_bytes = 2 * a.vocab * a.hidden * 4
    print(f"config: hidden {a.hidden}, intermediate {a.intermediate}, layers {a.layers}, heads {a.heads}/"
          f"{a.kv_heads} kv, vocab {a.vocab}; block linear params {n_block / 1e6:.1f} M; "
          f"fp32 embedding+lm_head {emb_head_bytes / 1e6:.1f} MB", flush=True)

    g = torch.Generator().manual_seed(a.seed + 1)
    prompt = torch.randint(0, a.vocab, (a.prompt_len,), generator=g).tolist()
    max_len = a.prompt_len + a.new_tokens
    example = (torch.tensor([[1]]), torch.tensor([0]))

    info = {}  # variant -> dict(path, size, export_s, checks, method)
    for v in a.variants:
        t0 = time.perf_counter()
        model = _build_model(cfg, state, v)
        q_s = time.perf_counter() - t0
        path = os.path.join(pte_dir, f"decoder-{v}.pte")
        t0 = time.perf_counter()
        if v.startswith("pq"):
            pe.export_executorch(LlamaKVStep(model, max_len), example, path)
        else:
            _export_xnnpack(LlamaKVStep(model, max_len), example, path)
        ex_s = time.perf_counter() - t0
        seq, ref = _eager_reference(LlamaKVStep(model, max_len), prompt, a.check_tokens)
        del model
        gc.collect()
        method = pe.load_executorch(path).method
        checks = {}
        if v.startswith("pq"):
            pe.set_activation_mode("fp32")
            try:
                checks["fp32 acts"] = _diff(_pte_logits(method, seq, a.prompt_len, a.check_tokens), ref)
            finally:
                pe.set_activation_mode("int8")
            checks["int8 acts"] = _diff(_pte_logits(method, seq, a.prompt_len, a.check_tokens), ref)
        else:
            checks["xnnpack"] = _diff(_pte_logits(method, seq, a.prompt_len, a.check_tokens), ref)
        size = os.path.getsize(path)
        info[v] = dict(path=path, size=size, quant_s=q_s, export_s=ex_s, checks=checks, method=method)
        print(f"{v}: {path} {_fmt_mb(size)} MB (quantize {q_s:.1f} s, export {ex_s:.1f} s)", flush=True)
        for name, d in checks.items():
            print(f"  {v} .pte vs eager [{name}]: max|dlogits| first token {d['first']:.3e}, "
                  f"first {d['n']} tokens {d['all']:.3e}, rel L2 {d['rel']:.2e}, argmax agree {d['agree']}/{d['n']}",
                  flush=True)

    # interleaved timing: warm up every variant at every thread count once, then reps
    times = {(v, th): [] for v in a.variants for th in a.threads}
    for th in a.threads:
        pe.set_num_threads(th)
        for v in a.variants:
            _decode(info[v]["method"], prompt, min(a.new_tokens, 4))
    for rep in range(a.reps):
        for th in a.threads:
            pe.set_num_threads(th)
            for v in a.variants:
                ts = _decode(info[v]["method"], prompt, a.new_tokens)
                med = statistics.median(ts)
                times[(v, th)].append(med)
                print(f"rep {rep + 1}/{a.reps} threads {th} {v}: {1 / med:.2f} tok/s "
                      f"(median of {len(ts)} steps {med * 1e3:.1f} ms)", flush=True)

    def tok_s(v, th):
        return 1.0 / statistics.median(times[(v, th)])

    base = "8da4w" if "8da4w" in info else None
    lines = [f"# ExecuTorch decoder benchmark ({date})", "",
             f"Machine: {_cpu()}, {os.cpu_count()} cores, {platform.platform()}; ParetoQ kernel path "
             f"{pe.kernel_path()}; torch {torch.__version__}",
             f"Command: `{command}`", "",
             f"Model: LlamaForCausalLM (random weights, seed {a.seed}), hidden {a.hidden}, intermediate "
             f"{a.intermediate}, {a.layers} layers, {a.heads} heads / {a.kv_heads} KV heads, vocab {a.vocab}, "
             f"untied; {n_block / 1e6:.1f} M block-linear parameters. Step = `LlamaKVStep` (static KV cache, "
             f"max_len {max_len}), one token per call.",
             "Token embedding and lm_head are float32 in every variant (embedding: portable aten::embedding; "
             f"lm_head: XNNPACK fp32), {_fmt_mb(emb_head_bytes)} MB of every file; only the block linears "
             "(q/k/v/o/gate/up/down) are quantized.",
             f"Decode: prompt of {a.prompt_len} tokens fed one per call, then {a.new_tokens} greedy tokens; "
             f"tokens/s = 1 / median step time over the generated steps, median over {a.reps} interleaved reps "
             "(for rep: for threads: for variant); range = min-max of the per-rep values.", ""]
    th_cols = [f"tok/s {th}T" for th in a.threads]
    hdr = (["variant", "label", ".pte MB", "MB w/o emb+head"] + th_cols
           + ([f"speed vs 8da4w {th}T" for th in a.threads] + ["size vs 8da4w", "size w/o emb+head vs 8da4w"] if base else []))
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for v in a.variants:
        s = info[v]["size"]
        cells = [v, LABELS[v], _fmt_mb(s), _fmt_mb(s - emb_head_bytes)]
        for th in a.threads:
            vals = [1 / t for t in times[(v, th)]]
            cells.append(f"{tok_s(v, th):.2f} ({min(vals):.2f}-{max(vals):.2f})")
        if base:
            for th in a.threads:
                cells.append(f"{tok_s(v, th) / tok_s(base, th):.2f}x")
            sb = info[base]["size"]
            cells.append(f"{s / sb:.3f}x")
            cells.append(f"{(s - emb_head_bytes) / (sb - emb_head_bytes):.3f}x")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Correctness (.pte vs its eager model, same tokens; max abs logit difference at the step "
              f"that predicts the first generated token, and over the first {a.check_tokens}):", "",
              "| variant | check | max abs diff (1st token) | max abs diff (first N) | rel L2 | argmax agree |",
              "|---|---|---|---|---|---|"]
    for v in a.variants:
        for name, d in info[v]["checks"].items():
            lines.append(f"| {v} | {name} | {d['first']:.3e} | {d['all']:.3e} | {d['rel']:.2e} | {d['agree']}/{d['n']} |")
    lines += ["", "Export (this machine): " + "; ".join(
        f"{v} quantize {info[v]['quant_s']:.0f} s + export {info[v]['export_s']:.0f} s" for v in a.variants)]
    if base:
        lines += ["", "Targets (2-bit vs 8da4w):"]
        for v in [x for x in a.variants if x.startswith("pq")]:
            sr = info[v]["size"] / info[base]["size"]
            sr2 = (info[v]["size"] - emb_head_bytes) / (info[base]["size"] - emb_head_bytes)
            lines.append(f"- {v}: size {sr:.3f}x of 8da4w (whole file; target <= 0.6: {'met' if sr <= 0.6 else 'NOT met'}), "
                         f"{sr2:.3f}x without the fp32 embedding+lm_head ({'met' if sr2 <= 0.6 else 'NOT met'}); "
                         + ", ".join(f"{th}T decode {tok_s(v, th) / tok_s(base, th):.2f}x of 8da4w "
                                     f"({'faster' if tok_s(v, th) > tok_s(base, th) else 'NOT faster'})"
                                     for th in a.threads))
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
    with open(results, "w") as f:
        f.write(text)
    print("written", results, "; .pte files in", pte_dir)
    for v in info:
        info[v].pop("method")
    return dict(results=results, pte_dir=pte_dir, text=text, info=info,
                tok_s={(v, th): tok_s(v, th) for v in a.variants for th in a.threads})


if __name__ == "__main__":
    main()
