"""Smoke test of benchmarks/pareto_study.py: the --tiny mode end to end in a subprocess."""

import datetime
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "pareto_study.py")


def test_pareto_study_tiny(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, SCRIPT, "--tiny", "--results-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
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
    # fewer bits -> fewer stored bytes (ternary and 2-bit both store 2-bit codes)
    mb = {b: rows[("xs", b, "ParetoQ QAT")]["linear_mb"] for b in bits}
    assert mb[4] > mb[3] > mb[2] == mb[1.58] > mb[1]
    assert mb[4] < rows[("xs", None, "FP")]["linear_mb"]
    # ablations (first size): SEQ vs LSQ at 2 and 1.58 bits, three budget splits
    abl = res["ablation"]
    assert sum(a["study"] == "grid" for a in abl) == 4 and sum(a["study"] == "split" for a in abl) == 3
    assert all(math.isfinite(a["ppl"]) for a in abl)
    assert "Command: `python benchmarks/pareto_study.py --tiny" in md
    assert "## What reproduces / what does not at this scale" in md
