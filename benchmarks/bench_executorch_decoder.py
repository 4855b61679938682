"""A whole Llama-style decoder inside the ExecuTorch runtime: decode tokens/s and .pte size.

Same architecture and the same random weights for every variant (a transformers LlamaForCausalLM
built from a LlamaConfig), wrapped in ``paretoq_ao.export.llama.LlamaKVStep`` (static KV cache,
one token per call) and exported to ``.pte``:

* ``fp32``   - float32, everything lowered to XNNPACK;
* ``8da4w``  - torchao ``Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
  weight_granularity=PerGroup(32))`` on every block linear, lowered to XNNPACK;
* ``pq<bits>`` / ``pq<bits>-g<group>`` (e.g. ``pq2``, ``pq1.58``, ``pq2-g64``) -
  ``ParetoQWeightOnlyConfig(bits=..., group_size=...)`` on every block linear (per-row scales without
  ``-g``), exported with ``paretoq_ao.export.export_executorch`` (our C++ kernels, int8 activations;
  the rest to XNNPACK).

The physical limit: this machine's DRAM read bandwidth is measured in the same run, per thread
count (``paretoq_ao.export.cpu_backend.read_bandwidth``: a streaming read of a 1 GiB buffer), before
the exports and again before each rep (the best reading is the limit: a neighbour's load only lowers
it), and the rest of each step (the step minus the lm_head alone) is converted to GB/s of the
program's bytes without embedding and head, and to a fraction of that bandwidth. With ``--profile``
(the default) one more run per program and thread count records ExecuTorch's own ETDump profile and
splits the step into block linears, lm_head, attention and the rest (``_etdump_profile.py``): the
block linears' own read bandwidth, and the head's time inside the step, where its weights are no
longer cached (alone, they are, so step minus head-alone overstates the rest).

The token embedding is float32 in every variant (portable ``aten::embedding``), or, with
``--embedding 4`` / ``8``, group-32 quantized in 8da4w and ours alike
(``paretoq_ao.export.embedding``: ExecuTorch's own ``quantized_decomposed::embedding_4bit`` /
``embedding_byte`` kernels; the fp32 variant keeps it float32). The ``lm_head`` is
handled the same way in 8da4w and ours: float32 on XNNPACK (``--head fp32``, the default) or torchao
8da4w group 32 on XNNPACK (``--head 8da4w``); the fp32 variant always keeps it float32. So the
quantized files differ only in the block linears (q/k/v/o/gate/up/down). The embedding and head are
a fixed part of every file, so sizes are also reported without them, and the lm_head alone (same
weights, same handling, its own small ``.pte``) is timed too, to show how much of a decode step it
takes.

    python benchmarks/bench_executorch_decoder.py                    # hidden 2048, 16 layers, vocab 32000 (_decoder.py)
    python benchmarks/bench_executorch_decoder.py --head 8da4w       # lm_head 8da4w in 8da4w and ours
    python benchmarks/bench_executorch_decoder.py --head 8da4w --embedding 4   # deployable: all quantized
    python benchmarks/bench_executorch_decoder.py --small --results /tmp/r.md   # tiny, for tests

Decode timing: a prompt of ``--prompt-len`` tokens is fed one token per call (KV cache), then
``--new-tokens`` tokens are generated greedily; each step that produces a generated token is timed
around ``method.execute`` and the median step time gives tokens/s. Timing runs are interleaved
(for rep: for threads: for variant) so that load from other processes on the machine spreads over
all variants; the table reports the median over reps of each rep's median (and the min-max).
Each timing run loads its program afresh after ``set_num_threads``: XNNPACK delegates capture
ExecuTorch's pthreadpool when the method is loaded, and resizing the pool frees the old one, so a
method loaded before ``set_num_threads`` must not be executed after it.

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
if os.path.join(ROOT, "benchmarks") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import _etdump_profile  # noqa: E402
import _llamacpp_rows  # noqa: E402
from _decoder import add_shape_args, fill_shape, is_block_linear, llama_config  # noqa: E402
from _meta import cpu_model, dram_bandwidth, git_commit, results_path, write_text  # noqa: E402
ALL_VARIANTS = ("fp32", "8da4w", "pq2", "pq1.58")  # the default set; any pq<bits>[-g<group>] works
_BASE_LABELS = {"fp32": "fp32 (XNNPACK)", "8da4w": "torchao 8da4w g32 (XNNPACK)"}


def _pq_variant(v):
    """(bits, group_size) of a ``pq<bits>[-g<group>][-rows]`` variant, or None (``-rows``: the
    program keeps the packed rows in row order instead of the default blocked16)."""
    import re

    m = re.fullmatch(r"pq(1\.58|[1-4])(?:-g(\d+))?(?:-rows)?", v)
    if not m:
        return None
    return (1.58 if m.group(1) == "1.58" else int(m.group(1))), (int(m.group(2)) if m.group(2) else None)


def _label(v):
    if v in _BASE_LABELS:
        return _BASE_LABELS[v]
    bits, gs = _pq_variant(v)
    order = ", row order" if v.endswith("-rows") else ""
    return f"ParetoQ {bits}-bit {'per-row' if gs is None else f'group {gs}'}{order} (ours)"

SMALL = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512)


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true",
                    help="tiny config (hidden 128, 2 layers, vocab 512) and few tokens, for tests")
    add_shape_args(ap, SMALL, "--small")
    ap.add_argument("--variants", default=",".join(ALL_VARIANTS), help=f"comma list of {ALL_VARIANTS}")
    ap.add_argument("--head", choices=("fp32", "8da4w"), default="fp32",
                    help="lm_head in the quantized variants (the same for 8da4w and ours)")
    ap.add_argument("--embedding", choices=("fp32", "4", "8"), default="fp32",
                    help="token embedding in the quantized variants (the same for 8da4w and ours; group 32)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 8 (3 with --small)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 32 (4 with --small)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved timing repeats, default 5 (1 with --small)")
    ap.add_argument("--max-len", type=int, default=None,
                    help="KV-cache length of the programs (default 256, what `paretoq export` writes; "
                         "at least prompt + new tokens)")
    ap.add_argument("--attention", choices=("custom", "reference"), default="custom",
                    help="KV-step attention of every variant (paretoq_ao.export.llama): ExecuTorch's "
                         "llama::custom_sdpa (default) or plain ops over the whole cache")
    ap.add_argument("--check-tokens", type=int, default=4, help="generated tokens compared with eager")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pte-dir", default=None, help="where the .pte files go (default: a temp dir, kept)")
    ap.add_argument("--llama-cpp", default=None, metavar="DIR",
                    help="a built llama.cpp (build/bin/llama-bench): adds llama.cpp rows on the same weights")
    ap.add_argument("--gguf", default="", help="with --llama-cpp: comma list of pq<bits>[-g<group>][=TYPE] rows "
                    "(default: every pq variant in its default GGUF type; see benchmarks/_llamacpp_rows.py)")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                    help="after timing, one ETDump-profiled run per program and thread count: where the step "
                         "time goes inside the runtime (benchmarks/_etdump_profile.py)")
    ap.add_argument("--results", default=None,
                    help="markdown output (default benchmarks/results/executorch-decoder-<date>.md)")
    a = ap.parse_args(argv)
    fill_shape(a, SMALL, a.small)
    if a.prompt_len is None:
        a.prompt_len = 3 if a.small else 8
    if a.new_tokens is None:
        a.new_tokens = 4 if a.small else 32
    if a.reps is None:
        a.reps = 1 if a.small else 5
    a.max_len = a.max_len or max(256, a.prompt_len + a.new_tokens)
    if a.max_len < a.prompt_len + a.new_tokens:
        ap.error(f"--max-len {a.max_len} is shorter than --prompt-len + --new-tokens = {a.prompt_len + a.new_tokens}")
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in a.variants if v not in _BASE_LABELS and _pq_variant(v) is None]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from fp32, 8da4w, pq<bits>[-g<group>] (bits 1, 1.58, 2, 3, 4)")
    a.threads = [int(t) for t in a.threads.split(",")]
    a.gguf = _llamacpp_rows.parse_specs(a.gguf, a.variants, ap.error) if a.llama_cpp else []
    a.check_tokens = max(1, min(a.check_tokens, a.new_tokens))
    return a


def _config(a):  # positions actually used; the KV cache (a.max_len) may be longer
    return llama_config(a, a.prompt_len + a.new_tokens)


def _8da4w():
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))


def _build_model(cfg, state, variant, head, embedding="fp32"):
    """A fresh LlamaForCausalLM with ``state`` loaded, quantized for ``variant`` (lm_head: ``head``
    for the quantized variants, fp32 for the fp32 variant)."""
    from transformers import LlamaForCausalLM
    from torchao import quantize_
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(state)
    model.float()
    if variant != "fp32" and head == "8da4w":
        quantize_(model, _8da4w(), filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and fqn == "lm_head")
    if variant != "fp32" and embedding != "fp32":
        from paretoq_ao.export.embedding import quantize_embeddings
        quantize_embeddings(model, int(embedding), 32)
    if variant == "8da4w":
        quantize_(model, _8da4w(), filter_fn=is_block_linear)
    elif variant.startswith("pq"):
        from paretoq_ao import ParetoQWeightOnlyConfig
        bits, gs = _pq_variant(variant)
        quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=gs), filter_fn=is_block_linear)
    return model


def _build_head(state, head):
    """The lm_head alone (same weights), handled as ``head``."""
    from torchao import quantize_
    w = state["lm_head.weight"]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False).eval()
    with torch.no_grad():
        lin.weight.copy_(w)
    if head == "8da4w":
        quantize_(lin, _8da4w(), filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear))
    return lin


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


def _fmt_mb(n):
    return f"{n / 1e6:.1f}"


def _bandwidth_lines(a, info, bandwidth, rest_s):
    """The rest of each step (step - lm_head alone) as GB/s of the program's bytes without
    embedding and head, and as a fraction of the DRAM read bandwidth measured in this run (the best
    of its measurements: before the exports and before each rep)."""
    best = {th: max(bw) for th, bw in bandwidth.items()}
    lines = ["", "DRAM read bandwidth measured in this run (streaming read of a 1 GiB buffer, "
             "paretoq_ao.export.cpu_backend.read_bandwidth, before the exports and before each rep; best, "
             "and all readings): "
             + ", ".join(f"{th} thread(s) {best[th]:.1f} GB/s ({' / '.join(f'{x:.1f}' for x in bandwidth[th])})"
                         for th in a.threads),
             "", "Rest of the step (head removed) as read bandwidth of the bytes without embedding and head:", "",
             "| variant | MB w/o emb+head | " + " | ".join(f"rest {th}T ms | GB/s {th}T | % of DRAM {th}T" for th in a.threads) + " |",
             "|---|---|" + "---|---|---|" * len(a.threads)]
    for v in a.variants:
        cells = [v, _fmt_mb(info[v]["core"])]
        for th in a.threads:
            r = rest_s(v, th)
            gbs = info[v]["core"] / r / 1e9 if r > 0 else float("nan")
            cells += [f"{r * 1e3:.2f}", f"{gbs:.1f}", f"{100 * gbs / best[th]:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _profile_lines(a, info, prof, bandwidth):
    """The ETDump split of each program's step (benchmarks/_etdump_profile.py), with the block
    linears' and the rest of the step's read bandwidth of the block weights."""
    best = {th: max(bw) for th, bw in bandwidth.items()}
    lines = ["", f"Inside the runtime (ETDump profile: one more run per program and thread count, mean of "
             f"{a.new_tokens} steps after 4 warm-up steps; the tracer adds a little per event): ms per step in "
             "the block linears (112 calls), the lm_head (in the step, where its weights are no longer cached: "
             "compare the lm_head-alone column above), attention (llama::custom_sdpa / update_cache) and "
             "everything else; block GB/s = bytes w/o embedding and head / block-linear time, rest GB/s = the "
             "same bytes / (step - lm_head in the step); % = of the best DRAM reading:", "",
             "| variant | threads | step ms | block linears ms | lm_head ms | attention ms | other ms | calls | "
             "block GB/s | block % of DRAM | rest GB/s | rest % of DRAM |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in a.variants:
        for th in a.threads:
            p, core = prof[(v, th)], info[v]["core"]
            blk = core / (p["linears"] * 1e-3) / 1e9 if p["linears"] > 0 else None
            blk_cells = f"{blk:.1f} | {100 * blk / best[th]:.0f}%" if blk else "- | -"  # under the tracer's tick
            rest = core / ((p["step"] - p["head"]) * 1e-3) / 1e9
            lines.append(f"| {v} | {th} | {p['step']:.2f} | {p['linears']:.2f} | {p['head']:.2f} | "
                         f"{p['attention']:.2f} | {p['other']:.2f} | {p['linear_calls']:.0f} | {blk_cells} | "
                         f"{rest:.1f} | {100 * rest / best[th]:.0f}% |")
    return lines


def _time_head(method, hidden, n):
    """Per-call times (s) of the lm_head-alone program on one token."""
    x = torch.randn(1, 1, hidden)
    for _ in range(2):
        method.execute([x])
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        method.execute([x])
        ts.append(time.perf_counter() - t0)
    return ts


def _export_heads(a, state, pte_dir):
    """The lm_head alone for each head handling in use: its .pte path and size (subtracted from
    the decoder sizes) -- timed like the decoders."""
    import paretoq_ao.export as pe

    heads = {}
    for h in sorted({_head_of(a, v) for v in a.variants}, key=("fp32", "8da4w").index):
        path = os.path.join(pte_dir, f"lm_head-{h}.pte")
        pe.export_executorch(_build_head(state, h), (torch.randn(1, 1, a.hidden),), path)  # all XNNPACK
        heads[h] = dict(path=path, size=os.path.getsize(path))
        print(f"lm_head alone ({h}): {path} {_fmt_mb(heads[h]['size'])} MB", flush=True)
    return heads


def _head_of(a, v):
    return "fp32" if v == "fp32" else a.head


def _emb_bytes(a, v):
    """Stored bytes of the token embedding in variant v."""
    if v == "fp32" or a.embedding == "fp32":
        return a.vocab * a.hidden * 4
    return a.vocab * a.hidden * int(a.embedding) // 8 + a.vocab * (a.hidden // 32) * 4


def _export_variant(a, cfg, state, v, pte_dir, prompt, max_len):
    """Quantize and export variant v, check its .pte against its eager model; returns
    dict(path, size, quant_s, export_s, checks)."""
    import paretoq_ao.export as pe
    from paretoq_ao.export.llama import LlamaKVStep, export_llama

    t0 = time.perf_counter()
    model = _build_model(cfg, state, v, a.head, a.embedding)
    q_s = time.perf_counter() - t0
    path = os.path.join(pte_dir, f"decoder-{v}.pte")
    path_f = os.path.join(pte_dir, f"decoder-{v}-float-acts.pte")  # ours, for the accuracy check
    t0 = time.perf_counter()
    att = a.attention
    order = "rows" if v.endswith("-rows") else "blocked16"
    # the timed program: int8 activations (the default)
    export_llama(model, path, max_len=max_len, attention=att, weight_order=order)
    if v.startswith("pq"):  # (no packed layer: all XNNPACK)
        export_llama(model, path_f, max_len=max_len, activations="float", attention=att, weight_order=order)
    ex_s = time.perf_counter() - t0
    seq, ref = _eager_reference(LlamaKVStep(model, max_len, attention=att), prompt, a.check_tokens)
    del model
    gc.collect()
    checks = {}
    programs = [("fp32 acts", path_f), ("int8 acts", path)] if v.startswith("pq") else [("xnnpack", path)]
    for name, prog in programs:
        method = pe.load_executorch(prog).method
        checks[name] = _diff(_pte_logits(method, seq, a.prompt_len, a.check_tokens), ref)
        del method
        gc.collect()
    if v.startswith("pq"):
        os.unlink(path_f)
    size = os.path.getsize(path)
    print(f"{v}: {path} {_fmt_mb(size)} MB (quantize {q_s:.1f} s, export {ex_s:.1f} s)", flush=True)
    for name, d in checks.items():
        print(f"  {v} .pte vs eager [{name}]: max|dlogits| first token {d['first']:.3e}, "
              f"first {d['n']} tokens {d['all']:.3e}, rel L2 {d['rel']:.2e}, argmax agree {d['agree']}/{d['n']}",
              flush=True)
    return dict(path=path, size=size, quant_s=q_s, export_s=ex_s, checks=checks)


def _time_interleaved(a, info, heads, prompt, bandwidth, llama=None):
    """{(program, threads): [median step s per rep]}; for rep: for threads: for program, each run
    loading its program afresh after set_num_threads (see the module docstring). ``llama``:
    dict(paths, rows) of the llama.cpp rows, timed by llama-bench in the same loop. The DRAM read
    bandwidth is measured again before each rep's programs of each thread count and appended to
    ``bandwidth[threads]`` (the machine's bandwidth varies with its neighbours' load)."""
    progs = [(v, info[v]["path"]) for v in a.variants] + [(f"head:{h}", heads[h]["path"]) for h in heads]
    progs += [(f"llama:{n}", r["path"]) for n, r in (llama or {}).get("rows", {}).items()]
    times = {(p, th): [] for p, _ in progs for th in a.threads}
    for rep in range(a.reps):
        for th in a.threads:
            bandwidth[th].append(dram_bandwidth([th], gib=0.25 if a.small else 1.0)[th])
            for p, path in progs:
                if p.startswith("llama:"):
                    med, llama["commit"] = _llamacpp_rows.time_once(
                        llama["paths"], path, th, a.new_tokens, f"{path}.t{th}.r{rep}.log")
                else:
                    med = _time_pte(p, path, th, a, prompt)
                times[(p, th)].append(med)
                print(f"rep {rep + 1}/{a.reps} threads {th} {p}: {med * 1e3:.2f} ms/token "
                      f"({1 / med:.2f}/s)", flush=True)
    return times


def _time_pte(p, path, th, a, prompt) -> float:
    """The median step time of one timing run of a program (loaded afresh after set_num_threads)."""
    import paretoq_ao.export as pe

    pe.set_num_threads(th)
    method = pe.load_executorch(path).method
    if p.startswith("head:"):
        ts = _time_head(method, a.hidden, a.new_tokens)
    else:
        _decode(method, prompt, min(2, a.new_tokens))  # warm-up (page-in, first-call setup)
        ts = _decode(method, prompt, a.new_tokens)
    del method
    gc.collect()
    return statistics.median(ts)


class _Times:
    """Median step / lm_head / rest-of-step times and tokens/s over the interleaved reps."""

    def __init__(self, a, times):
        self.a, self.times = a, times

    def step(self, p, th):
        return statistics.median(self.times[(p, th)])

    def rest(self, v, th):
        return self.step(v, th) - self.step(f"head:{_head_of(self.a, v)}", th)

    def tok_s(self, v, th):
        return 1.0 / self.step(v, th)


def _header_lines(a, meta):
    import paretoq_ao.export as pe

    head_desc = ("float32 in every variant (XNNPACK fp32 linear)" if a.head == "fp32" else
                 "torchao 8da4w group 32 (XNNPACK) in 8da4w and ours, float32 in the fp32 variant")
    fp32_emb = _fmt_mb(_emb_bytes(a, "fp32"))
    emb_desc = (f"Token embedding: float32 in every variant (portable aten::embedding, {fp32_emb} MB). "
                if a.embedding == "fp32" else
                f"Token embedding: {a.embedding}-bit group 32 in 8da4w and ours (ExecuTorch quantized_decomposed "
                f"kernels, {_fmt_mb(_emb_bytes(a, '8da4w'))} MB), float32 in fp32 ({fp32_emb} MB). ")
    return [f"# ExecuTorch decoder benchmark ({meta['date']})", "",
            f"Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.platform()}; ParetoQ kernel path "
            f"{pe.kernel_path()}; torch {torch.__version__}; this repo {git_commit() or 'unknown'}",
            f"Command: `{meta['command']}`", "",
            f"Model: LlamaForCausalLM (random weights, seed {a.seed}), hidden {a.hidden}, intermediate "
            f"{a.intermediate}, {a.layers} layers, {a.heads} heads / {a.kv_heads} KV heads, vocab {a.vocab}, "
            f"untied; {meta['n_block'] / 1e6:.1f} M block-linear parameters. Step = `LlamaKVStep` (static KV "
            f"cache, max_len {meta['max_len']}, {a.attention} attention: "
            + ("ExecuTorch's llama::custom_sdpa / update_cache" if a.attention == "custom" else
               "plain ops over the whole cache") + "), one token per call.",
            emb_desc + f"lm_head: {head_desc}. Only the block linears (q/k/v/o/gate/up/down) differ between "
            "8da4w and ours.",
            f"Decode: prompt of {a.prompt_len} tokens fed one per call, then {a.new_tokens} greedy tokens; "
            f"tokens/s = 1 / median step time over the {a.new_tokens} steps that produce a token, median over "
            f"{a.reps} interleaved reps (for rep: for threads: for variant, each run loads the .pte afresh); "
            "range = min-max of the per-rep values.",
            "\"MB w/o emb+head\" = file size - embedding bytes - size of the lm_head-alone .pte "
            "(same weights and handling).", ""]


def _speed_lines(a, info, t, base):
    hdr = (["variant", "label", ".pte MB", "MB w/o emb+head"] + [f"tok/s {th}T" for th in a.threads]
           + ([f"speed vs 8da4w {th}T" for th in a.threads] + ["size vs 8da4w", "size w/o emb+head vs 8da4w"]
              if base else []))
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for v in a.variants:
        s, core = info[v]["size"], info[v]["core"]
        cells = [v, _label(v), _fmt_mb(s), _fmt_mb(core)]
        for th in a.threads:
            vals = [1 / x for x in t.times[(v, th)]]
            cells.append(f"{t.tok_s(v, th):.2f} ({min(vals):.2f}-{max(vals):.2f})")
        if base:
            cells += [f"{t.tok_s(v, th) / t.tok_s(base, th):.2f}x" for th in a.threads]
            cells += [f"{s / info[base]['size']:.3f}x", f"{core / info[base]['core']:.3f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Where the step time goes: the lm_head alone (its own .pte, one token) and the rest of the "
              "step (median step time - median lm_head time), ms:", "",
              "| variant | lm_head | " + " | ".join(f"step {th}T | lm_head {th}T | rest {th}T" for th in a.threads) + " |",
              "|---|---|" + "---|---|---|" * len(a.threads)]
    for v in a.variants:
        cells = [v, _head_of(a, v)]
        for th in a.threads:
            cells += [f"{t.step(v, th) * 1e3:.2f}", f"{(t.step(v, th) - t.rest(v, th)) * 1e3:.2f}",
                      f"{t.rest(v, th) * 1e3:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _check_lines(a, info, t, base, prof=None, bandwidth=None):
    lines = ["", "Correctness (.pte vs its eager model, same tokens; max abs logit difference at the step "
             f"that predicts the first generated token, and over the first {a.check_tokens}):", "",
             "| variant | check | max abs diff (1st token) | max abs diff (first N) | rel L2 | argmax agree |",
             "|---|---|---|---|---|---|"]
    for v in a.variants:
        for name, d in info[v]["checks"].items():
            lines.append(f"| {v} | {name} | {d['first']:.3e} | {d['all']:.3e} | {d['rel']:.2e} | {d['agree']}/{d['n']} |")
    lines += ["", "Export (this machine): " + "; ".join(
        f"{v} quantize {info[v]['quant_s']:.0f} s + export {info[v]['export_s']:.0f} s" for v in a.variants)]
    if not base:
        return lines
    lines += ["", "Targets (ours vs 8da4w):"]
    for v in [x for x in a.variants if x.startswith("pq")]:
        sr, sr2 = info[v]["size"] / info[base]["size"], info[v]["core"] / info[base]["core"]
        lines.append(f"- {v}: size {sr:.3f}x of 8da4w (whole file; target <= 0.6: {'met' if sr <= 0.6 else 'NOT met'}), "
                     f"{sr2:.3f}x without embedding+lm_head ({'met' if sr2 <= 0.6 else 'NOT met'}); "
                     + ", ".join(f"{th}T decode {t.tok_s(v, th) / t.tok_s(base, th):.2f}x of 8da4w "
                                 f"({'faster' if t.tok_s(v, th) > t.tok_s(base, th) else 'NOT faster'})"
                                 for th in a.threads))
    if "pq2" in info:  # issue 11: 2-bit >= 2x 8da4w tokens/s, rest of the step >= 70 % of DRAM
        for th in a.threads:
            r = t.tok_s("pq2", th) / t.tok_s(base, th)
            line = f"- pq2 {th}T: {r:.2f}x 8da4w tokens/s (target >= 2x: {'met' if r >= 2 else 'NOT met'})"
            if prof:
                p, best = prof[("pq2", th)], max(bandwidth[th])
                frac = info["pq2"]["core"] / ((p["step"] - p["head"]) * 1e-3) / 1e9 / best
                line += (f"; rest of the step (ETDump, lm_head in the step removed) at {100 * frac:.0f}% of DRAM "
                         f"(target >= 70%: {'met' if frac >= 0.7 else 'NOT met'})")
            lines.append(line)
    return lines


def main(argv=None):
    a = _parse(argv)
    from transformers import LlamaForCausalLM
    import executorch.runtime  # noqa: F401
    import paretoq_ao.export as pe

    argv_used = sys.argv[1:] if argv is None else list(argv)
    meta = dict(command=" ".join([".venv/bin/python", "benchmarks/bench_executorch_decoder.py"] + argv_used),
                date=datetime.datetime.now().isoformat(timespec="seconds"))
    pte_dir = a.pte_dir or tempfile.mkdtemp(prefix="pte-decoder-")
    os.makedirs(pte_dir, exist_ok=True)
    results = a.results or results_path(ROOT, "executorch-decoder", meta["date"])

    pe.load_kernels()
    bandwidth = {th: [bw] for th, bw in dram_bandwidth(a.threads, gib=0.25 if a.small else 1.0).items()}
    print("DRAM read bandwidth: " + ", ".join(f"{th}T {bw[0]:.1f} GB/s" for th, bw in bandwidth.items()), flush=True)
    torch.manual_seed(a.seed)
    cfg = _config(a)
    state = {k: v.clone() for k, v in LlamaForCausalLM(cfg).eval().float().state_dict().items()}
    meta["n_block"] = sum(v.numel() for k, v in state.items() if ".layers." in k and k.endswith("proj.weight"))
    print(f"config: hidden {a.hidden}, intermediate {a.intermediate}, layers {a.layers}, heads {a.heads}/"
          f"{a.kv_heads} kv, vocab {a.vocab}; block linear params {meta['n_block'] / 1e6:.1f} M; "
          f"fp32 embedding {_emb_bytes(a, 'fp32') / 1e6:.1f} MB; lm_head {a.head} in the quantized variants",
          flush=True)
    g = torch.Generator().manual_seed(a.seed + 1)
    prompt = torch.randint(0, a.vocab, (a.prompt_len,), generator=g).tolist()
    meta["max_len"] = a.max_len

    heads = _export_heads(a, state, pte_dir)
    info = {}
    for v in a.variants:
        info[v] = _export_variant(a, cfg, state, v, pte_dir, prompt, meta["max_len"])
        info[v]["core"] = info[v]["size"] - _emb_bytes(a, v) - heads[_head_of(a, v)]["size"]
    llama = None
    if a.llama_cpp:
        import bench_llamacpp

        llama = dict(paths=bench_llamacpp._llama_cpp_paths(a.llama_cpp), commit=None)
        llama["rows"] = _llamacpp_rows.build(a, a.gguf, lambda v: _build_model(cfg, state, v, "fp32", "fp32"),
                                             pte_dir)
    t = _Times(a, _time_interleaved(a, info, heads, prompt, bandwidth, llama))
    prof = {(v, th): _etdump_profile.profile_decoder(info[v]["path"], th, prompt, a.new_tokens)
            for v in a.variants for th in a.threads} if a.profile else None

    base = "8da4w" if "8da4w" in info else None
    lines = _header_lines(a, meta) + _speed_lines(a, info, t, base)
    lines += _bandwidth_lines(a, info, bandwidth, t.rest)
    if prof:
        lines += _profile_lines(a, info, prof, bandwidth)
    if base:
        lines += ["", "Rest-of-step speed vs 8da4w (lm_head time removed): " + "; ".join(
            f"{v} {th}T {t.rest(base, th) / t.rest(v, th):.2f}x"
            for v in a.variants if v.startswith("pq") for th in a.threads)]
    if llama:
        lines += _llamacpp_rows.report_lines(a, llama["rows"], t.times, info, llama["commit"])
    lines += _check_lines(a, info, t, base, prof, bandwidth)
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(results, text)
    print("written", results, "; .pte files in", pte_dir)
    return dict(results=results, pte_dir=pte_dir, text=text, info=info, heads=heads, profile=prof, bandwidth=bandwidth,
                step_s={k: statistics.median(x) for k, x in t.times.items()},
                tok_s={(v, th): t.tok_s(v, th) for v in a.variants for th in a.threads})


if __name__ == "__main__":
    main()
