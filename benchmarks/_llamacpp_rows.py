"""llama.cpp rows for bench_executorch_decoder.py: the same quantized weights as our ``.pte``
variants, written by ``paretoq_ao.export.gguf`` and decoded by ``llama-bench`` inside the same
interleaved timing loop (for rep: for threads: for program), so that ours and llama.cpp are
measured side by side in one run on one machine.

A row ``pq<bits>[-g<group>][=TYPE]`` is the decoder with ParetoQ RTN at ``bits`` (per-row scales, or
one scale per ``group`` inputs) on every block linear -- the weights of our ``pq<bits>[-g<group>]``
variant -- exported to GGUF type ``TYPE`` (default: per row, the smallest type that holds the format
exactly: pq4 Q4_0, pq3 Q3_K, pq2 Q2_K, pq1.58 / pq1 TQ1_0; ``pq1.58=TQ2_0`` for the other ternary
type; with groups below 256 the exporter's group default, Q4_0 for 4-bit (exact) and Q3_K / Q2_K
holding the groups' scales in their integer sub-scales, the nearest -- its error is reported; ``=Q4_0``
is exact for every format with groups of 32k). The embedding and head get the GGUF type closest to
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

_SPEC = re.compile(r"pq(1\.58|[1-4])(?:-g(\d+))?(?:=([A-Z0-9_]+))?")


def parse_specs(text: str, variants, fail) -> list:
    """[(row name, our variant, bits, GGUF type or None)]; ``text`` empty: every pq variant."""
    items = [s.strip() for s in text.split(",") if s.strip()] or [v for v in variants if _SPEC.fullmatch(v)]
    out = []
    for s in items:
        m = _SPEC.fullmatch(s.upper().replace("PQ", "pq").replace("-G", "-g"))
        if not m:
            fail(f"--gguf: {s!r} is not pq<bits>[-g<group>][=TYPE] (bits 1, 1.58, 2, 3, 4; e.g. pq1.58=TQ2_0, "
                 "pq2-g64=Q4_0)")
        bits = 1.58 if m.group(1) == "1.58" else int(m.group(1))
        variant = f"pq{m.group(1)}" + (f"-g{m.group(2)}" if m.group(2) else "")
        out.append((s, variant, bits, m.group(3)))
    return out


def _side_types(a):
    """GGUF types of the embedding and head closest to the benchmark's own (bench_cpu_decoder has a float
    embedding and a float or 4-bit head; bench_executorch_decoder also 4/8-bit embeddings, an 8da4w head)."""
    emb = {"fp32": "F32", "4": "Q4_0", "8": "Q8_0"}[getattr(a, "embedding", "fp32")]
    return emb, ("Q4_0" if a.head in ("8da4w", "pq4") else "F32")


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
    for name, variant, bits, kind in specs:
        t0 = time.perf_counter()
        model = build_model(variant)
        path = os.path.join(work, f"decoder-{name.replace('=', '-')}.gguf")
        rep = export_gguf(model, tok, path, embedding_type=emb, head_type=head,
                          weight_types={bits: kind} if kind else None)
        del model
        types = sorted({r["type"] for n, r in rep["tensors"].items() if n.startswith("blk.") and r["type"] != "F32"})
        # the block linears only: the embedding and head are quantized from float by design (as in llama.cpp's own files)
        errs = [rep["tensors"][n]["rel_error"] for n in rep["inexact"] if n.startswith("blk.")]
        rows[name] = dict(path=path, size=rep["bytes"], type="/".join(types), bits=bits, variant=variant,
                          inexact=len(errs), max_error=max(errs, default=0.0))
        print(f"llama.cpp row {name}: {path} {rep['bytes'] / 1e6:.1f} MB ({rows[name]['type']}, embedding {emb}, "
              f"head {head}; {len(errs)} block tensors nearest, not exact), {time.perf_counter() - t0:.1f} s",
              flush=True)
    return rows


def time_once(paths, path: str, threads: int, new_tokens: int, log: str):
    """One llama-bench tg run: (step time in s = 1 / tokens per second, llama.cpp's build commit)."""
    import bench_llamacpp as bl

    r = bl._bench_once(paths, path, threads, argparse.Namespace(n_gen=new_tokens, n_prompt=0), log)
    return 1.0 / r["tg"], r.get("build_commit")


def _same_weights(r: dict) -> str:
    """Whether the row's GGUF block tensors hold our weights exactly, or how near they are."""
    return "exact" if not r["inexact"] else f"nearest ({r['inexact']} tensors, <= {r['max_error']:.1%})"


def time_prefill_decode(paths, rows, a, work: str) -> dict:
    """llama-bench pp<prompt-len> + tg<new-tokens> for every row, interleaved (for rep: for threads: for row):
    {(row, threads): [dict(prefill_s, tok_s)]}, and "commit": llama.cpp's build commit."""
    import bench_llamacpp as bl

    runs, commit = {(n, th): [] for n in rows for th in a.threads}, None
    for rep in range(a.reps):
        for th in a.threads:
            for name, r in rows.items():
                log = os.path.join(work, f"{os.path.basename(r['path'])}.t{th}.r{rep}.log")
                got = bl._bench_once(paths, r["path"], th, argparse.Namespace(n_gen=a.new_tokens,
                                                                              n_prompt=a.prompt_len), log)
                commit = got.get("build_commit")
                runs[(name, th)].append(dict(prefill_s=a.prompt_len / got["pp"], tok_s=got["tg"]))
                print(f"llama.cpp rep {rep + 1}/{a.reps} {th}T {name}: prefill {a.prompt_len / got['pp'] * 1e3:.1f} "
                      f"ms, decode {got['tg']:.2f} tok/s", flush=True)
    return dict(runs=runs, commit=commit)


def cpu_lines(a, rows, timed, infos) -> list:
    """The PyTorch-CPU side-by-side table of bench_cpu_decoder: each llama.cpp row against every one of our
    variants with the same weights (float and int8 activations; eager and compiled), per thread count."""
    lines = ["", "## llama.cpp on the same weights", "",
             f"llama-bench pp{a.prompt_len} (prefill ms = {a.prompt_len} / its tok/s) and tg{a.new_tokens} on our "
             f"GGUF export of each variant's weights (llama.cpp {timed['commit']}; rows: benchmarks/_llamacpp_rows.py), "
             f"median of {a.reps} interleaved runs, in the same process run after the variants above. Ours: prefill "
             "ms and decode tok/s from the Decode table (prefill includes the first token's logits). Ratios > 1: "
             "ours faster.", "",
             "| row | GGUF block type | same weights | .gguf MB | threads | llama.cpp prefill ms | llama.cpp tok/s "
             "| ours | ours MB | ours prefill ms | ours tok/s | decode ours / llama.cpp | prefill ours / llama.cpp |",
             "|" + "---|" * 13]
    for name, r in rows.items():
        same = _same_weights(r)
        ours = [v for v in (r["variant"], r["variant"] + "-i8") if v in infos and infos[v].get("rows")]
        for th in a.threads:
            runs = timed["runs"][(name, th)]
            pre = statistics.median(x["prefill_s"] for x in runs)
            tok = statistics.median(x["tok_s"] for x in runs)
            left = [name, r["type"], same, f"{r['size'] / 1e6:.1f}", str(th), f"{pre * 1e3:.1f}", f"{tok:.2f}"]
            cells = [[f"{v} {m}", f"{infos[v]['bytes']['total'] / 1e6:.1f}", f"{o['prefill_s'] * 1e3:.1f}",
                      f"{o['tok_s']:.2f}", f"{o['tok_s'] / tok:.2f}x", f"{pre / o['prefill_s']:.2f}x"]
                     for v in ours for m in a.modes
                     for o in [infos[v]["rows"].get((m, th))] if o is not None and "error" not in o]
            for c in cells or [["(no variant of these weights in this run)"] + ["-"] * 5]:
                lines.append("| " + " | ".join(left + c) + " |")
    return lines


def report_lines(a, rows, times, info, build_commit: str) -> list:
    """The side-by-side table: our .pte (same weights) against llama.cpp on our GGUF file."""
    lines = ["", f"llama.cpp on the same weights (llama-bench tg{a.new_tokens}, llama.cpp {build_commit}, interleaved "
             "with the programs above; rows: benchmarks/_llamacpp_rows.py):", "",
             "| row | GGUF block type | same weights | .gguf MB | "
             + " | ".join(f"llama.cpp tok/s {th}T" for th in a.threads)
             + " | our .pte MB | " + " | ".join(f"ours / llama.cpp {th}T" for th in a.threads) + " | target |",
             "|---|---|---|---|" + "---|" * len(a.threads) + "---|" + "---|" * len(a.threads) + "---|"]
    for name, r in rows.items():
        key = f"llama:{name}"
        ours = r["variant"]
        same = _same_weights(r)
        cells = [name, r["type"], same, f"{r['size'] / 1e6:.1f}"]
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
