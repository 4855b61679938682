"""llama.cpp rows for bench_executorch_decoder.py: the same quantized weights as our ``.pte``
variants, written by ``paretoq_ao.export.gguf`` and decoded by ``llama-bench`` inside the same
interleaved timing loop (for rep: for threads: for program), so that ours and llama.cpp are
measured side by side in one run on one machine.

A row ``pq<bits>[=TYPE]`` is the decoder with ParetoQ RTN at ``bits`` (per-row scales) on every
block linear -- the weights of our ``pq<bits>`` variant -- exported to GGUF type ``TYPE`` (default:
the smallest type that holds the format exactly: pq4 Q4_0, pq3 Q3_K, pq2 Q2_K, pq1.58 / pq1 TQ1_0;
``pq1.58=TQ2_0`` for the other ternary type). The embedding and head get the GGUF type closest to
our variants' handling: float32 -> F32; ``--embedding 4`` (4-bit groups of 32) -> Q4_0,
``--embedding 8`` -> Q8_0; ``--head 8da4w`` (int4 groups of 32, int8 activations) -> Q4_0 (llama.cpp
multiplies Q4_0 with 8-bit activations too). llama-bench's ``tg<n>`` (``-n --new-tokens -p 0``)
gives the decode tokens/s; its step time enters the table as 1 / tok/s.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time

_SPEC = re.compile(r"pq(1\.58|[1-4])(?:=([A-Z0-9_]+))?")


def parse_specs(text: str, variants, fail) -> list:
    """[(row name, bits, GGUF type or None)]; ``text`` empty: every per-row pq variant."""
    items = [s.strip() for s in text.split(",") if s.strip()] or [v for v in variants if re.fullmatch(r"pq[0-9.]+", v)]
    out = []
    for s in items:
        m = _SPEC.fullmatch(s.upper().replace("PQ", "pq"))
        if not m:
            fail(f"--gguf: {s!r} is not pq<bits>[=TYPE] (bits 1, 1.58, 2, 3, 4; e.g. pq1.58=TQ2_0)")
        bits = 1.58 if m.group(1) == "1.58" else int(m.group(1))
        out.append((s, bits, m.group(2)))
    return out


def _side_types(a):
    emb = {"fp32": "F32", "4": "Q4_0", "8": "Q8_0"}[a.embedding]
    return emb, ("Q4_0" if a.head == "8da4w" else "F32")


def build(a, specs, build_model, work: str) -> dict:
    """Export every row; {row: dict(path, size, type, blk_bits)}. ``build_model(variant)`` returns the
    float-embedding, float-head model of a pq variant (the block linears as in our .pte)."""
    import bench_llamacpp as bl
    from transformers import AutoTokenizer

    from paretoq_ao.export.gguf import export_gguf

    tok_dir = os.path.join(work, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    bl._write_tokenizer(tok_dir, a.vocab)  # SentencePiece, exactly --vocab pieces
    tok = AutoTokenizer.from_pretrained(tok_dir)
    emb, head = _side_types(a)
    rows = {}
    for name, bits, kind in specs:
        t0 = time.perf_counter()
        model = build_model(f"pq{bits}")
        path = os.path.join(work, f"decoder-{name.replace('=', '-')}.gguf")
        rep = export_gguf(model, tok, path, embedding_type=emb, head_type=head,
                          weight_types={bits: kind} if kind else None)
        del model
        types = sorted({r["type"] for n, r in rep["tensors"].items() if n.startswith("blk.") and r["type"] != "F32"})
        rows[name] = dict(path=path, size=rep["bytes"], type="/".join(types), bits=bits, inexact=len(rep["inexact"]))
        print(f"llama.cpp row {name}: {path} {rep['bytes'] / 1e6:.1f} MB ({rows[name]['type']}, embedding {emb}, "
              f"head {head}), {time.perf_counter() - t0:.1f} s", flush=True)
    return rows


def time_once(paths, path: str, threads: int, new_tokens: int, log: str):
    """One llama-bench tg run: (step time in s = 1 / tokens per second, llama.cpp's build commit)."""
    import bench_llamacpp as bl

    r = bl._bench_once(paths, path, threads, argparse.Namespace(n_gen=new_tokens, n_prompt=0), log)
    return 1.0 / r["tg"], r.get("build_commit")


def report_lines(a, rows, times, info, build_commit: str) -> list:
    """The side-by-side table: our .pte (same weights) against llama.cpp on our GGUF file."""
    lines = ["", f"llama.cpp on the same weights (llama-bench tg{a.new_tokens}, llama.cpp {build_commit}, interleaved "
             "with the programs above; rows: benchmarks/_llamacpp_rows.py):", "",
             "| row | GGUF block type | .gguf MB | " + " | ".join(f"llama.cpp tok/s {th}T" for th in a.threads)
             + " | our .pte MB | " + " | ".join(f"ours / llama.cpp {th}T" for th in a.threads) + " | target |",
             "|---|---|---|" + "---|" * len(a.threads) + "---|" + "---|" * len(a.threads) + "---|"]
    for name, r in rows.items():
        key = f"llama:{name}"
        ours = f"pq{r['bits']}"
        cells = [name, r["type"], f"{r['size'] / 1e6:.1f}"]
        tok = {th: 1.0 / statistics.median(times[(key, th)]) for th in a.threads}
        cells += [f"{tok[th]:.2f}" for th in a.threads]
        if ours in info:
            ratio = {th: (1.0 / statistics.median(times[(ours, th)])) / tok[th] for th in a.threads}
            want = 1.0 if r["bits"] == 4 else 1.3
            met = all(x >= want for x in ratio.values()) and info[ours]["size"] <= r["size"]
            cells += [f"{info[ours]['size'] / 1e6:.1f}"] + [f"{ratio[th]:.2f}x" for th in a.threads]
            cells.append(f">= {want}x and no larger: {'met' if met else 'NOT met'}")
        else:
            cells += ["-"] + ["-"] * len(a.threads) + [f"(no {ours} variant in this run)"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
