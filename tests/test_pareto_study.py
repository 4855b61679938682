"""Smoke test of benchmarks/pareto_study.py: the --tiny mode end to end in a subprocess, and the
per-size FP pre-training LR rule / warm-up."""

import argparse
import datetime
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "pareto_study.py")


def _study():
    spec = importlib.util.spec_from_file_location("pareto_study", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path, *flags):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, SCRIPT, "--tiny", "--results-dir", str(out), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    return proc, out


def test_pretrain_lr_rule():
    ps = _study()
    # lr = 6e-3 * (64 / hidden_size) ** 1.5: the tuned values of the pre-training sweep
    assert ps.pretrain_lr("xs") == pytest.approx(6e-3)
    assert ps.pretrain_lr("s") == pytest.approx(6e-3 / 2 ** 1.5)
    assert ps.pretrain_lr("m") == pytest.approx(6e-3 / 3 ** 1.5)
    by_width = sorted(ps.SIZES, key=lambda k: ps.SIZES[k]["hidden_size"])
    lrs = [ps.pretrain_lr(k) for k in by_width]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # wider -> smaller LR
    assert ps.pretrain_lr("s", base=1e-2, exp=1.0) == pytest.approx(5e-3)
    assert ps.warmup_steps(720, ps.PRETRAIN_WARMUP) == 50
    assert ps.warmup_steps(9, 0.07) == 1 and ps.warmup_steps(10, 0.0) == 0 and ps.warmup_steps(5, 1.0) == 5
    assert "| size (width) | LR | no warm-up |" in "\n".join(ps.PRETRAIN_SWEEP)


def test_pareto_study_one_lr_override(tmp_path):
    proc, out = _run(tmp_path, "--sizes", "xxs", "--bits", "2", "--no-ablation", "--pretrain-lr", "1e-3",
                     "--pretrain-warmup", "0")
    assert proc.returncode == 0, proc.stderr[-4000:]
    date = datetime.date.today().isoformat()
    res = json.loads((out / f"pareto-{date}.json").read_text())
    assert res["pretrain"] == {"xxs": {"lr": 1e-3, "warmup_steps": 0, "steps": 9}}
    assert res["pretrain_rule"] is None
    assert "one LR for every size (--pretrain-lr): xxs 0.001;" in (out / f"pareto-{date}.md").read_text()


def test_pareto_study_bad_warmup(tmp_path):
    proc, _ = _run(tmp_path, "--pretrain-warmup", "1.5")
    assert proc.returncode == 2 and "--pretrain-warmup" in proc.stderr


def test_pareto_study_tiny(tmp_path):
    proc, out = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    date = datetime.date.today().isoformat()
    md = (out / f"pareto-{date}.md").read_text()
    png = out / f"pareto-{date}.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / f"pareto-{date}.json").read_text())

    sizes, bits = ["xxs", "xs"], [4, 3, 2, 1.58, 1]
    rows = {(r["size"], r["bits"], r["method"]): r for r in res["rows"]}
    for size in sizes:
        assert math.isfinite(rows[(size, None, "FP")]["ppl"])
        for b in bits:
            for method in ("ParetoQ QAT", "RTN", "torchao QAT"):
                r = rows[(size, b, method)]
                if method == "torchao QAT" and b in (1.58, 1):
                    assert r["ppl"] is None  # n/a: torchao cannot express ternary / binary
                    line = f"| {size} | {r['params']:,} | {b:g} | {method} | {r['linear_mb']:.4f} | n/a |"
                else:
                    assert math.isfinite(r["ppl"]) and r["ppl"] > 1, r
                    line = f"| {size} | {r['params']:,} | {b:g} | {method} |"
                assert line in md, line
                assert r["linear_mb"] > 0
    # fewer bits -> fewer stored bytes; ternary at its real size (5 codes per byte), below 2-bit
    mb = {b: rows[("xs", b, "ParetoQ QAT")]["linear_mb"] for b in bits}
    assert mb[4] > mb[3] > mb[2] > mb[1.58] > mb[1]
    assert mb[4] < rows[("xs", None, "FP")]["linear_mb"]
    # ablations (first size): SEQ vs LSQ at 2 and 1.58 bits, three budget splits
    abl = res["ablation"]
    assert sum(a["study"] == "grid" for a in abl) == 4 and sum(a["study"] == "split" for a in abl) == 3
    assert all(math.isfinite(a["ppl"]) for a in abl)
    assert "Command: `python benchmarks/pareto_study.py --tiny" in md
    assert "## What reproduces / what does not at this scale" in md
    assert "## The paper's claims at this scale" in md
    assert "## Pre-training hyperparameters: the sweep behind the per-size rule" in md
    # FP pre-training used the per-size LR rule with warm-up (9 steps x 7 % -> 1 step)
    ps = _study()
    assert res["pretrain_rule"] == {"base": ps.PRETRAIN_LR_BASE, "width": 64, "exp": ps.PRETRAIN_LR_EXP}
    for size in sizes:
        hp = res["pretrain"][size]
        assert hp["lr"] == pytest.approx(ps.pretrain_lr(size)) and hp["warmup_steps"] == 1 and hp["steps"] == 9
        assert rows[(size, None, "FP")]["pretrain_lr"] == pytest.approx(ps.pretrain_lr(size))
    assert res["pretrain"]["xxs"]["lr"] > res["pretrain"]["xs"]["lr"]
    assert "per-size rule LR = 0.006 x (64 / hidden_size)^1.5: xxs 0.017, xs 0.006;" in md


def _synthetic_results(paper_holds: bool):
    """A results dict of the shape ``run_study`` returns (sizes xs < s, bits 4 and 2, ablations on xs), with
    numbers chosen so that every conclusion ``findings`` draws goes the paper's way, or every one the other way."""
    if paper_holds:
        fp = {"xs": 50.0, "s": 40.0}
        qat = {("xs", 4): 52.0, ("xs", 2): 60.0, ("s", 4): 41.0, ("s", 2): 48.0}
        worse = 1.2  # RTN and torchao QAT 20 % above ParetoQ QAT
        grid = {2: (60.0, 70.0), 1.58: (65.0, 80.0)}  # bits: (SEQ, LSQ)
        split = (60.0, 62.0, 90.0)  # 90/10, 70/30, 100/0
    else:
        fp = {"xs": 40.0, "s": 50.0}
        qat = {("xs", 4): 62.0, ("xs", 2): 42.0, ("s", 4): 51.0, ("s", 2): 70.0}
        worse = 0.8  # RTN and torchao QAT 20 % below ParetoQ QAT
        grid = {2: (70.0, 60.0), 1.58: (80.0, 65.0)}
        split = (60.0, 62.0, 55.0)
    mb = {("xs", 4): 0.4, ("xs", 2): 0.2, ("s", 4): 0.8, ("s", 2): 0.4}  # s/2b stores as few bytes as xs/4b
    rows = []
    for size in ("xs", "s"):
        rows.append(dict(size=size, params=1000, bits=None, method="FP", linear_mb=1.6, ppl=fp[size]))
        for b in (4, 2):
            q = qat[(size, b)]
            for method, ppl in (("ParetoQ QAT", q), ("RTN", q * worse), ("torchao QAT", q * worse)):
                rows.append(dict(size=size, params=1000, bits=b, method=method, linear_mb=mb[(size, b)], ppl=ppl))
    ablation = []
    for b, (seq, lsq) in grid.items():
        ablation += [dict(study="grid", size="xs", bits=b, variant="SEQ (ParetoQ)", ppl=seq, linear_mb=0.2),
                     dict(study="grid", size="xs", bits=b, variant="LSQ (grid with 0)", ppl=lsq, linear_mb=0.2)]
    for variant, ppl in zip(("90/10 (9 FP + 1 QAT steps)", "70/30 (7 FP + 3 QAT steps)",
                             "100/0 (10 FP steps, RTN)"), split):
        ablation.append(dict(study="split", size="xs", bits=2, variant=variant, ppl=ppl, linear_mb=0.2))
    return dict(rows=rows, ablation=ablation)


@pytest.mark.parametrize("paper_holds", [True, False])
def test_findings_conclusions_follow_the_numbers(paper_holds):
    ps = _study()
    args = argparse.Namespace(sizes=["xs", "s"], bits=[4, 2])
    out = ps.findings(_synthetic_results(paper_holds), args)
    text = "\n".join(out)
    assert out[-1].startswith("Caveats: one seed")
    assert out[0].startswith("**xs** (FP ppl ")
    if paper_holds:
        expected = [
            "FP perplexity falls with model size (xs 50.00, s 40.00) under the per-size pre-training LR rule",
            "**xs**: ParetoQ QAT perplexity rises monotonically as bits fall (4b 52.00, 2b 60.00).",
            "ParetoQ QAT beats RTN in 4 of 4 (size, bits) cells.",
            "ParetoQ QAT vs torchao QAT (same bits, budget, LR, batches): ParetoQ lower in 4 of 4 cells",
            "the bigger one is better in 1 of 1 such pairs (s/2b 0.400 MB ppl 48.00 < xs/4b 0.400 MB ppl 52.00)",
            "Grid ablation 2-bit (xs): SEQ 60.00 vs LSQ 70.00 -> SEQ lower.",
            "Grid ablation 1.58-bit (xs): SEQ 65.00 vs LSQ 80.00 -> SEQ lower.",
            "Budget split at 2 bits (fixed total): 90/10 60.00, 70/30 62.00, 100/0 90.00 -> best 90/10.",
        ]
        unexpected = ["does NOT", "LSQ lower", "-> best 100/0", ">= xs/4b"]
    else:
        expected = [
            "FP perplexity does NOT fall with model size (xs 40.00, s 50.00): the larger model ends worse",
            "**xs**: ParetoQ QAT perplexity does NOT rise monotonically as bits fall (4b 62.00, 2b 42.00).",
            "ParetoQ QAT beats RTN in 0 of 4 (size, bits) cells.",
            "ParetoQ QAT vs torchao QAT (same bits, budget, LR, batches): ParetoQ lower in 0 of 4 cells",
            "the bigger one is better in 0 of 1 such pairs (s/2b 0.400 MB ppl 70.00 >= xs/4b 0.400 MB ppl 62.00)",
            "Grid ablation 2-bit (xs): SEQ 70.00 vs LSQ 60.00 -> LSQ lower.",
            "Grid ablation 1.58-bit (xs): SEQ 80.00 vs LSQ 65.00 -> LSQ lower.",
            "Budget split at 2 bits (fixed total): 90/10 60.00, 70/30 62.00, 100/0 55.00 -> best 100/0.",
        ]
        unexpected = ["SEQ lower", "-> best 90/10", "FP perplexity falls", "**xs**: ParetoQ QAT perplexity rises"]
    for line in expected:
        assert line in text, (line, out)
    for line in unexpected:
        assert line not in text, (line, out)
    # per-size lines: QAT vs FP in percent and the RTN/QAT ratio (< 1 when RTN is the better one)
    assert f"RTN/QAT ppl ratio {1.2 if paper_holds else 0.8:.2f}" in out[0]
    # the frontier lists, smallest bytes first, each point that lowers the best perplexity so far
    frontier = next(line for line in out if line.startswith("ParetoQ QAT size-vs-perplexity frontier"))
    assert frontier.endswith(": xs/2b, s/2b, s/4b." if paper_holds else ": xs/2b.")
