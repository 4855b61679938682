"""How much of the QAT-to-FP perplexity gap distillation closes, at the same token budget.

    python benchmarks/distill_gap.py                         # 2000 FP steps, bits 2,1.58,1, seeds 1,2
    python benchmarks/distill_gap.py --pretrain-steps 100 --bits 2 --seeds 1 --out /tmp/d.md   # smoke

The recipe's tiny Llama (``TINY_LLAMA``, a 1024-token BPE) is pre-trained in full precision on the
offline stdlib corpus (batch 16 x 128, LR 3e-3, 7 % warm-up, cosine), then for every seed and bit
width two QAT runs start from copies of it with the same budget (10 % of the pre-training tokens,
the paper's LR x 10 as in ``paretoq demo``): plain cross-entropy, and distillation from the FP
model (``QATRecipe(distill=True)``, T = 1, w = 1). Held-out perplexity on 64 blocks of the stdlib
validation split, and on 64 blocks spread over the second corpus that nothing trains on (``--second``,
default ``fortunes``: Debian's fortunes package, see ``paretoq_ao.data``; ``none`` to skip); gap
closed = (ppl plain - ppl distill) / (ppl plain - ppl FP). One FP model (one pre-training seed): the
QAT seeds give the spread. The issue-16 study (3 full seeds, three sizes) is ``pareto_study.py``;
this is the same question at a 2.5x larger token budget.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from _meta import cpu_model, git_commit, results_path, write_text  # noqa: E402


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrain-steps", type=int, default=2000)
    ap.add_argument("--bits", default="2,1.58,1")
    ap.add_argument("--seeds", default="1,2", help="QAT seeds (the FP model uses seed 0)")
    ap.add_argument("--second", default="fortunes", help='second held-out corpus ("none" to skip)')
    ap.add_argument("--out", default=None, help="markdown results (default benchmarks/results/distill-gap-<date>.md)")
    a = ap.parse_args(argv)
    a.bits = [float(b) if "." in b else int(b) for b in a.bits.split(",") if b.strip()]
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    return a


def _second(name, tok):
    """64 blocks of 128 tokens spread evenly over the second corpus, or None."""
    from paretoq_ao.workflow.data import PackedBlocks, load_texts, tokenize

    if name == "none":
        return None
    return PackedBlocks(tokenize(load_texts(name, "all"), tok), 128).evenly_spaced(64)


def _setup(steps):
    import torch

    from paretoq_ao.workflow.data import PackedBlocks, load_texts, tokenize, train_tokenizer
    from paretoq_ao.workflow.models import _make_sampler, tiny_llama
    from paretoq_ao.workflow.settings import QATRecipe
    from paretoq_ao.workflow.train import train_steps

    torch.manual_seed(0)
    texts = load_texts("stdlib", "train", max_chars=1_500_000)
    tok = train_tokenizer(texts, 1024)
    blocks = PackedBlocks(tokenize(texts, tok), 128, source="stdlib[train]")
    val = PackedBlocks(tokenize(load_texts("stdlib", "validation", max_chars=200_000), tok), 128).blocks[:64]
    fp = tiny_llama(len(tok), seed=0)
    train_steps(fp, _make_sampler(QATRecipe(block_size=128, batch_size=16, steps=1), blocks), steps, 3e-3,
                warmup_steps=steps * 7 // 100)
    return fp, tok, blocks, val  # (main evaluates fp on every corpus once)


def _qat_ppl(fp, tok, blocks, evals, bits, seed, pre_tokens, distill):
    """{corpus: held-out ppl} of one QAT run from a copy of ``fp``, and its step count."""
    from paretoq_ao.workflow.evaluate import perplexity
    from paretoq_ao.workflow.settings import QATRecipe, paper_lr
    from paretoq_ao.workflow.train import run_qat

    model = copy.deepcopy(fp)
    r = QATRecipe(model="<distill-gap>", bits=bits, block_size=128, batch_size=16, pretrain_tokens=pre_tokens,
                  token_fraction=0.1, lr=paper_lr(bits) * 10, seed=seed, output_dir=None, progress=False,
                  distill=distill)
    res = run_qat(r, model=model, tokenizer=tok, train_blocks=blocks)
    return {name: perplexity(model, v)["ppl"] for name, v in evals.items()}, res.steps


def main(argv=None):
    from paretoq_ao.workflow.evaluate import perplexity

    a = _parse(argv)
    t0 = time.time()
    fp, tok, blocks, val = _setup(a.pretrain_steps)
    evals = {"stdlib": val}
    second = _second(a.second, tok)
    if second is not None:
        evals[a.second] = second
    fp_ppl = {name: perplexity(fp, v)["ppl"] for name, v in evals.items()}
    print(f"FP: {a.pretrain_steps} steps, held-out ppl {fp_ppl} ({time.time() - t0:.0f} s)", flush=True)
    rows = {}
    for bits in a.bits:
        for seed in a.seeds:
            plain, steps = _qat_ppl(fp, tok, blocks, evals, bits, seed, a.pretrain_steps * 16 * 128, False)
            dist, _ = _qat_ppl(fp, tok, blocks, evals, bits, seed, a.pretrain_steps * 16 * 128, True)
            rows.setdefault(bits, []).append((seed, plain, dist))
            print(f"{bits}-bit seed {seed}: plain {plain}, distill {dist} ({steps} QAT steps, "
                  f"{time.time() - t0:.0f} s)", flush=True)
    text = _report(a, fp_ppl, rows, steps, time.time() - t0)
    out = a.out or results_path(os.path.dirname(HERE), "distill-gap", datetime.date.today().isoformat())
    write_text(out, text)
    print(text + f"\nwritten {out}")
    return dict(fp=fp_ppl, rows=rows, out=out)


def _report(a, fp_ppl, rows, steps, seconds):
    from _pareto_claims import DISTILL, aggregate, cell_lookup, distill_gain, fmt_diff, lower_verdict, mean_sd

    def spread(xs):
        m, sd = mean_sd(xs)
        return f"{m:.2f} ± {sd:.2f}"

    lines = [f"# Distillation: share of the QAT-to-FP gap closed ({datetime.date.today().isoformat()})", "",
             f"Machine: {cpu_model()}, {os.cpu_count()} cores; repo {git_commit()}; {seconds:.0f} s. Command: "
             f"`benchmarks/distill_gap.py {' '.join(sys.argv[1:])}`", "",
             f"FP: tiny Llama (TINY_LLAMA), {a.pretrain_steps} steps of 16 x 128 tokens, held-out ppl "
             + ", ".join(f"{k} {v:.3f}" for k, v in fp_ppl.items())
             + f". QAT: {steps} steps (10 % of the pre-training tokens), paper LR x 10; distill = KL to the FP "
             "model (T = 1, w = 1). Mean ± sd over the QAT seeds; gap closed = mean(plain - distill) / mean(plain "
             "- FP); 'distill - plain' is the paired difference with its 95 % interval (benchmarks/_pareto_claims.py).",
             "", "| bits | corpus | seeds | ppl plain QAT | ppl distill | gap closed | distill - plain | per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for bits, rs in rows.items():
        for corpus, fp in fp_ppl.items():
            # the study's cells (one FP model for every QAT seed) and its gap-closed formula
            cells = [dict(size="s", bits=None, method="FP", seed=seed, ppl=fp) for seed, _, _ in rs]
            cells += [dict(size="s", bits=bits, method=m, seed=seed, ppl=res[corpus]) for seed, p, d in rs
                      for m, res in (("ParetoQ QAT", p), (DISTILL, d))]
            g = distill_gain(cell_lookup(aggregate(cells)), "s", bits)
            plain, dist = g["plain"]["seeds"], g["dist"]["seeds"]
            closed = f"{g['closed']:.1f} %" if g["closed"] is not None else "no gap"
            lines.append(f"| {bits} | {corpus} | {len(rs)} | {spread(plain.values())} | {spread(dist.values())} | "
                         f"{closed} | {fmt_diff(g['diff'])} ({lower_verdict(g['diff'])}) | "
                         + ", ".join(f"{k}: {plain[k]:.2f} -> {dist[k]:.2f}" for k in plain) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
