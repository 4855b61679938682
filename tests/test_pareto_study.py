"""Smoke test of benchmarks/pareto_study.py: the --tiny mode end to end in a subprocess (seeds, the
second corpus, the distillation column), the per-size FP pre-training LR rule / warm-up, and the
statistics behind the verdicts (benchmarks/_pareto_claims.py) against hand-computed values."""

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


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _study():
    return _load("pareto_study", SCRIPT)  # puts benchmarks/ on sys.path for its helper modules


def _claims():
    _study()
    return _load("_pareto_claims", os.path.join(ROOT, "benchmarks", "_pareto_claims.py"))


def _fortunes(tmp_path):
    """A small stand-in for Debian's fortunes folder (the study's default second corpus)."""
    root = tmp_path / "fortunes"
    root.mkdir(exist_ok=True)
    text = "\n%\n".join(f"Fortune number {i}: the quick brown fox jumps over the lazy dog, {i * 7} times."
                         for i in range(400))
    (root / "misc").write_text(text + "\n%\n")
    return root


def _run(tmp_path, *flags):
    """The script as CI's users run it: a subprocess with its own interpreter."""
    out = tmp_path / "results"
    env = dict(os.environ, PARETOQ_FORTUNES_DIR=str(_fortunes(tmp_path)))
    proc = subprocess.run([sys.executable, SCRIPT, "--tiny", "--results-dir", str(out), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=400, env=env)
    return proc, out


def _main(out, *flags):
    """The script's ``main`` in this process (same argument parsing and code path, no interpreter start-up)."""
    return _study().main(["--tiny", "--results-dir", str(out), *flags])


# one study with an LR override and two seeds, no second corpus: run once, read by two tests below
TWO_SEEDS = ("--sizes", "xxs", "--bits", "2", "--no-ablation", "--pretrain-lr", "1e-3", "--pretrain-warmup", "0",
             "--seeds", "3,5", "--second-corpus", "none")


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """One results folder that receives two studies on the same day: first the two-seed study (TWO_SEEDS,
    in-process), then the default ``--tiny`` study as a real subprocess. The second must not overwrite the
    first: it writes ``pareto-<date>-2.*``. ``first`` is the first study's JSON as read before the second ran."""
    tmp = tmp_path_factory.mktemp("pareto")
    out = tmp / "results"
    assert _main(out, *TWO_SEEDS) == 0
    date = datetime.date.today().isoformat()
    first = json.loads((out / f"pareto-{date}.json").read_text())
    proc, _ = _run(tmp)  # writes to the same tmp / "results"
    return dict(out=out, date=date, first=first, tiny=proc)


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
    rep = _load("_pareto_report", os.path.join(ROOT, "benchmarks", "_pareto_report.py"))
    assert "| size (width) | LR | no warm-up |" in "\n".join(rep.PRETRAIN_SWEEP)


def test_pareto_study_one_lr_override_two_seeds(studies):
    out, date, res = studies["out"], studies["date"], studies["first"]
    assert res["pretrain"] == {"xxs": {"lr": 1e-3, "warmup_steps": 0, "steps": 9}}
    assert res["pretrain_rule"] is None and res["seeds"] == [3, 5] and res["second_corpus"] is None
    md = (out / f"pareto-{date}.md").read_text()
    assert "one LR for every size (--pretrain-lr): xxs 0.001;" in md
    # one row per (method, seed); the table holds the mean ± sd of the two seeds; the seeds differ
    cm = _claims()
    for method in ("FP", "ParetoQ QAT", "ParetoQ QAT + distill", "RTN", "torchao QAT"):
        rows = [r for r in res["rows"] if r["method"] == method]
        assert [r["seed"] for r in rows] == [3, 5] and all(r["ppl2"] is None for r in rows)
        m, sd = cm.mean_sd([r["ppl"] for r in rows])
        assert sd > 0 and f"| {method} | {rows[0]['linear_mb']:.4f} | {cm._fmt(m)} ± {cm._fmt(sd)} |" in md
    assert "fortunes ppl" not in md and "No second corpus (--second-corpus none)." in md
    # a second run the same day (the --tiny study of the fixture) keeps the first one's files
    assert studies["tiny"].returncode == 0, studies["tiny"].stderr[-4000:]
    assert (out / f"pareto-{date}-2.json").is_file() and json.loads((out / f"pareto-{date}.json").read_text()) == res


@pytest.mark.parametrize("flags, message", [
    (("--pretrain-warmup", "1.5"), "--pretrain-warmup"),
    (("--seeds", "0,x"), "--seeds takes comma-separated integers"),
    (("--seeds", "1,1"), "no repeats"),
    (("--second-corpus", "/nowhere/at/all.txt"), "--second-corpus /nowhere/at/all.txt: data file"),
    (("--report", "/nowhere/r.json"), "--report /nowhere/r.json: cannot read a study's JSON"),
    (("--eval-blocks", "0"), "--eval-blocks must be at least 1, got 0"),
    (("--batch-size", "0"), "--batch-size must be at least 1, got 0"),
    (("--pretrain-steps", "-3"), "--pretrain-steps must be at least 1, got -3"),
    (("--lr-scale", "-1"), "--lr-scale must be positive, got -1.0"),
])
def test_pareto_study_bad_arguments(tmp_path, monkeypatch, capsys, flags, message):
    # in-process: argparse's exit status and message are the same as from the command line (the --tiny
    # study above runs the script as a subprocess); a subprocess would only add the interpreter start-up
    monkeypatch.setenv("PARETOQ_FORTUNES_DIR", str(_fortunes(tmp_path)))
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as e:
        _main(out, *flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err[-2000:]
    assert not out.exists() or not list(out.iterdir())  # refused before any work


def test_pareto_study_tiny(studies):
    proc, out, date = studies["tiny"], studies["out"], studies["date"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    md = (out / f"pareto-{date}-2.md").read_text()  # -2: the fixture's two-seed study came first
    png = out / f"pareto-{date}-2.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / f"pareto-{date}-2.json").read_text())

    sizes, bits = ["xxs", "xs"], [4, 3, 2, 1.58, 1]
    assert res["seeds"] == [0] and all(r["seed"] == 0 for r in res["rows"] + res["ablation"])
    rows = {(r["size"], r["bits"], r["method"]): r for r in res["rows"]}
    assert len(rows) == len(res["rows"])
    for size in sizes:
        assert math.isfinite(rows[(size, None, "FP")]["ppl"]) and math.isfinite(rows[(size, None, "FP")]["ppl2"])
        for b in bits:
            for method in ("ParetoQ QAT", "ParetoQ QAT + distill", "RTN", "torchao QAT"):
                r = rows[(size, b, method)]
                if method == "torchao QAT" and b in (1.58, 1):
                    assert r["ppl"] is None and r["ppl2"] is None  # n/a: torchao cannot express ternary / binary
                    line = f"| {size} | {r['params']:,} | {b:g} | {method} | {r['linear_mb']:.4f} | n/a | n/a |"
                else:
                    assert math.isfinite(r["ppl"]) and r["ppl"] > 1 and math.isfinite(r["ppl2"]) and r["ppl2"] > 1, r
                    line = (f"| {size} | {r['params']:,} | {b:g} | {method} | {r['linear_mb']:.4f} | "
                            f"{r['ppl']:.2f} | {r['ppl2']:.2f} |")
                assert line in md, line
                assert r["linear_mb"] > 0
            # distillation trains the same layers at the same bits: same stored bytes as plain QAT
            assert rows[(size, b, "ParetoQ QAT + distill")]["linear_mb"] == rows[(size, b, "ParetoQ QAT")]["linear_mb"]
    # the second corpus: described, evaluated on blocks spread over it, never trained on
    sec = res["second_corpus"]
    assert sec["name"] == "fortunes" and "fortunes" in sec["description"] and sec["blocks"] == 8
    assert "| size | params | bits | method | linears MB | stdlib ppl | fortunes ppl |" in md
    assert "### On stdlib" in md and "### On fortunes" in md
    assert "## Distillation: share of the QAT-to-FP gap closed" in md
    # fewer bits -> fewer stored bytes; ternary at its real size (5 codes per byte), below 2-bit
    mb = {b: rows[("xs", b, "ParetoQ QAT")]["linear_mb"] for b in bits}
    assert mb[4] > mb[3] > mb[2] > mb[1.58] > mb[1]
    assert mb[4] < rows[("xs", None, "FP")]["linear_mb"]
    # ablations (first size): SEQ vs LSQ at 2 and 1.58 bits, three budget splits
    abl = res["ablation"]
    assert sum(a["study"] == "grid" for a in abl) == 4 and sum(a["study"] == "split" for a in abl) == 3
    assert all(math.isfinite(a["ppl"]) and math.isfinite(a["ppl2"]) for a in abl)
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
    cm = _claims()
    args = argparse.Namespace(sizes=["xs", "s"], bits=[4, 2])
    out = cm.findings(_synthetic_results(paper_holds), args)
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


def test_paired_difference_and_its_interval_by_hand():
    cm = _claims()
    # a - b per seed: -1.0, -1.5, -1.0 -> mean -7/6, sd sqrt(1/12), t(2 df) = 4.303
    d = cm.paired({0: 10.0, 1: 12.0, 2: 11.0, 9: 1.0}, {0: 11.0, 1: 13.5, 2: 12.0})
    half = 4.303 * math.sqrt(1 / 12) / math.sqrt(3)
    assert d["n"] == 3 and d["lower"] == 3  # seed 9 has no partner: left out
    assert d["mean"] == pytest.approx(-7 / 6) and d["sd"] == pytest.approx(math.sqrt(1 / 12))
    assert (d["lo"], d["hi"]) == (pytest.approx(-7 / 6 - half), pytest.approx(-7 / 6 + half))
    assert cm.lower_verdict(d) == "lower"
    # two seeds, +1 and +0.5: t(1 df) = 12.706 makes the interval 0.75 -/+ 12.706 * 0.354 / 1.414: holds 0
    two = cm.paired({0: 12.0, 1: 14.0}, {0: 11.0, 1: 13.5})
    assert two["lo"] == pytest.approx(0.75 - 12.706 * 0.25) and cm.lower_verdict(two) == "within noise"
    assert cm.lower_verdict(cm.paired({0: 12.0, 1: 14.1, 2: 9.9}, {0: 11.0, 1: 13.0, 2: 9.0})) == "higher"
    noisy = cm.paired({0: 10.0, 1: 12.0, 2: 11.0}, {0: 11.0, 1: 11.0, 2: 11.5})  # -1, +1, -0.5
    assert noisy["lower"] == 2 and cm.lower_verdict(noisy) == "within noise"
    one = cm.paired({0: 10.0}, {0: 11.0})  # one seed decides nothing
    assert one["n"] == 1 and cm.lower_verdict(one) == "within noise" and "(1 seed)" in cm.fmt_diff(one)
    assert cm.paired({0: 1.0}, {1: 2.0}) is None and cm.lower_verdict(None) == "not run"


def _seeded_rows(distill_gain_per_seed, lsq_minus_seq):
    """Rows of one size (xs) at 2 bits over seeds 0..2: FP 50 + seed, plain QAT 60 + seed, distill = plain
    minus the given gain, and a grid ablation with LSQ = SEQ + the given differences."""
    rows, abl = [], []
    for seed, (gain, dl) in enumerate(zip(distill_gain_per_seed, lsq_minus_seq)):
        base = dict(size="xs", params=10, seed=seed, linear_mb=0.1, ppl2=None)
        rows += [dict(base, bits=None, method="FP", ppl=50.0 + seed),
                 dict(base, bits=2, method="ParetoQ QAT", ppl=60.0 + seed),
                 dict(base, bits=2, method="ParetoQ QAT + distill", ppl=60.0 + seed - gain)]
        abl += [dict(base, study="grid", bits=2, variant="SEQ (ParetoQ)", ppl=60.0 + seed),
                dict(base, study="grid", bits=2, variant="LSQ (grid with 0)", ppl=60.0 + seed + dl)]
    return dict(rows=rows, ablation=abl)


def test_distillation_share_and_claims_follow_the_spread():
    cm = _claims()
    args = argparse.Namespace(sizes=["xs"], bits=[2])
    res = _seeded_rows([4.0, 3.0, 5.0], [2.0, 2.5, 1.5])  # gap 10 per seed, gains 4, 3, 5
    get = cm.cell_lookup(cm.aggregate(res["rows"]))
    g = cm.distill_gain(get, "xs", 2)
    half = 4.303 * 1.0 / math.sqrt(3)  # t(2 df) x sd of the gains / sqrt(3), over the mean gap of 10
    assert g["n"] == 3 and g["gap"] == pytest.approx(10.0) and g["closed"] == pytest.approx(40.0)
    assert (g["closed_lo"], g["closed_hi"]) == (pytest.approx(40 - 10 * half), pytest.approx(40 + 10 * half))
    assert cm.lower_verdict(g["diff"]) == "lower" and g["diff"]["mean"] == pytest.approx(-4.0)
    text = "\n".join(cm.claims(res, args))
    assert "xs 2b 40 % [15, 65] (lower)" in text and "met at xs/2b; missed at none" in text
    assert "SEQ beats LSQ at <= 2 bits (xs): reproduces" in text
    # the same means with a spread that swallows them: nothing is decided
    noisy = _seeded_rows([9.0, -3.0, 6.0], [6.0, -3.5, 3.5])
    text = "\n".join(cm.claims(noisy, args))
    assert "xs 2b 40 % [-115, 195] (within noise)" in text and "met at none; missed at xs/2b" in text
    assert "SEQ beats LSQ at <= 2 bits (xs): undecided (within the seed noise)" in text
    # decided the other way
    worse = _seeded_rows([-4.0, -3.0, -5.0], [-2.0, -2.5, -1.5])
    text = "\n".join(cm.claims(worse, args))
    assert "xs 2b -40 % [-65, -15] (higher)" in text and "SEQ beats LSQ at <= 2 bits (xs): does NOT reproduce" in text
    # the table cell: mean ± sd over the seeds
    cell = get("xs", 2, "ParetoQ QAT")
    assert cell["seeds"] == {0: 60.0, 1: 61.0, 2: 62.0} and cm.fmt_cell(cell) == "61.00 ± 1.00"


def test_report_rerenders_a_saved_run_and_refuses_other_json(studies, tmp_path, capsys):
    out, date = studies["out"], studies["date"]
    first = (out / f"pareto-{date}.md").read_text()  # the two-seed study: its table holds mean ± sd
    assert _main(out, *TWO_SEEDS, "--report", str(out / f"pareto-{date}.json")) == 0
    again = (out / f"pareto-{date}-report.md").read_text()  # the run's own report is kept
    table = lambda md: md[md.index("## Results"):md.index("## Pre-training")]  # noqa: E731
    assert table(again) == table(first) and (out / f"pareto-{date}-report.png").is_file()
    bad = tmp_path / "other.json"
    bad.write_text('{"a": 1}')
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _main(tmp_path / "results", *TWO_SEEDS, "--report", str(bad))
    assert e.value.code == 2 and "not the JSON of a pareto_study run" in capsys.readouterr().err
