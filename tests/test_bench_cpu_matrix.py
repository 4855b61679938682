"""benchmarks/bench_cpu_matrix.py --quick: the whole flow (ExecuTorch and eager PyTorch, our layers and
the baselines, DRAM bandwidth, targets) on one small layer; checks the results file, not the timings.

Runs the script in a subprocess, as a user runs it (the ExecuTorch thread pool and loaded programs
stay out of the test process)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_cpu_matrix.py")
# --quick: 1024x512, 2-bit, layouts row + g64, acts int8 + float, M 1, threads 1
EXPECTED = {(rt, "1024 x 512", "2", layout, acts, "1", "1")
            for rt in ("et", "pt") for layout in ("row", "g64") for acts in ("int8", "float")}
RATIO = re.compile(r"^\d+\.\d+x$")

pytest.importorskip("executorch")
pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu_matrix") / "matrix.md"
    from paretoq_ao.export import _build, cpu_backend

    # build (or find cached) both kernel libraries here, so that the timeout below times the run only
    assert cpu_backend.available()
    _build.build_kernels()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(out) as f:
        return out, f.read(), proc.stdout


def _tables(text):
    """{runtime: [dict(column -> cell)]} from the markdown tables."""
    tables, header = {}, None
    for line in text.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            header = None if not line.startswith("|") else header
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "runtime":
            header = cells
            continue
        assert header is not None, line
        assert len(cells) == len(header), (header, cells)
        tables.setdefault(cells[0], []).append(dict(zip(header, cells)))
    return tables


def test_header(quick):
    _, text, _ = quick
    assert text.startswith("# CPU matrix: one linear layer")
    assert re.search(r"\(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\)", text.splitlines()[0])
    assert re.search(r"^Command: .*bench_cpu_matrix\.py --quick --out ", text, re.M)
    machine = next(line for line in text.splitlines() if line.startswith("Machine: "))
    for flag in ("avx2", "avx512_vnni", "avx512_vbmi2"):
        assert re.search(rf"{flag} (yes|no)", machine), machine
    assert re.search(r"\d+ cores", machine) and "L3 " in machine and "kernel path" in machine
    versions = next(line for line in text.splitlines() if line.startswith("Versions: "))
    for pkg in ("torch", "executorch", "torchao"):
        assert re.search(rf"{pkg} \d", versions), versions
    assert re.search(r"; git \S+", versions)


def test_dram_bandwidth_line(quick):
    _, text, _ = quick
    m = re.search(r"^DRAM read bandwidth \((.*)\): 1 thread\(s\) ([\d.]+) GB/s", text, re.M)
    assert m, text[:2000]
    assert "1 GiB" in m.group(1) and float(m.group(2)) > 0


def test_one_row_per_cell(quick):
    _, text, _ = quick
    tables = _tables(text)
    assert set(tables) == {"et", "pt"}
    keys = [(r["runtime"], r["K x N"], r["bits"], r["layout"], r["acts"], r["M"], r["threads"])
            for rows in tables.values() for r in rows]
    assert len(keys) == len(set(keys)) and set(keys) == EXPECTED


def test_numbers_ratios_and_plans(quick):
    _, text, _ = quick
    for rt, rows in _tables(text).items():
        for r in rows:
            assert float(r["ours ms"]) > 0 and float(r["fp32 ms"]) > 0, r
            assert RATIO.match(r["fp32/ours"]), r
            ratios = [v for k, v in r.items() if k.endswith("/ours")]
            assert all(RATIO.match(v) or v == "n/a" for v in ratios), r
            assert float(r["ours GB/s"]) > 0 and r["% DRAM"].endswith("%"), r
            plan = r["kernel plan"]
            assert re.match(r"(SLOW PATH: )?(scalar|avx2|avx512|neon|neondot)\b", plan), plan
            assert ("SLOW PATH" in plan) == ("scalar" in plan), plan
            assert r["acts"] in plan or "scalar" in plan or r["acts"] == "float" and "fp32" in plan, plan
            assert "WARNING" not in plan, plan
            assert re.match(r"\d+ \(\d+\)$", r["copies (MiB cycled)"]), r
        if rt == "et":
            assert all(r["8da4w ms"] for r in rows)


def test_targets_and_written_file(quick):
    out, text, stdout = quick
    section = text.split("## Targets", 1)[1]
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    assert lines and all(re.match(r"- (PASS|MISS|n/a) ", line) for line in lines), lines
    assert any("2-bit >= 1.8x 8da4w" in line for line in lines)
    assert f"written {out}" in stdout
    assert os.listdir(os.path.dirname(out)) == [os.path.basename(out)]  # atomic write: no temp file left
