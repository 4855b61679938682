"""Smoke test of benchmarks/pareto_study.py: the --tiny mode end to end in a subprocess, and the
per-size FP pre-training LR rule / warm-up."""

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
