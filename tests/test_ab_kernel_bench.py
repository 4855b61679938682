"""benchmarks/ab_kernel_bench.py: runs builds of the kernel bench alternately and tables every cell;
checks the table (cells, counts, ratios) and the one-line errors, not the timings."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "ab_kernel_bench.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import ab_kernel_bench  # noqa: E402

TABLE = """K=256 N=64, weights rotated past 1 MB x 3; best path here: avx2
| path | bits | layout | order | acts | M | threads | ms | GB/s | plan |
|---|---|---|---|---|---|---|---|---|---|
| avx2 | 2 | row | b16 | int8 | 1 | 1 | {a} | 1.0 | avx2 int8, 8 rows per vector |
| avx2 | 2 | g64 | b16 | int8 | 1 | 1 | {b} | 1.0 | avx2 int8, 8 rows per vector |
| avx2 | not available on this CPU |
"""


def _fake_bench(tmp_path, name, times):
    """An executable that prints the bench table, its timings taken in turn from `times` per call."""
    state = tmp_path / f"{name}.n"
    state.write_text("0")
    p = tmp_path / name
    p.write_text(
        "#!" + sys.executable + "\n"
        "import sys\n"
        f"times = {times!r}\n"
        f"n = int(open({str(state)!r}).read())\n"
        f"open({str(state)!r}, 'w').write(str(n + 1))\n"
        f"print({TABLE!r}.format(a=times[n][0], b=times[n][1]))\n"
    )
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return str(p)


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)


def test_min_median_and_ratio_per_cell(tmp_path):
    a = _fake_bench(tmp_path, "a", [(2.0, 4.0), (3.0, 5.0), (1.0, 9.0)])
    b = _fake_bench(tmp_path, "b", [(1.0, 4.0), (0.5, 8.0), (2.0, 2.0)])
    r = _run("--reps", "3", f"before={a}", f"after={b}", "--", "--bits", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("| bits | layout | order | acts | M | threads | before ms")
    assert len(lines) == 4  # header, separator, two cells (the "not available" line is not a cell)
    assert lines[2] == "| 2 | row | b16 | int8 | 1 | 1 | 1.000 / 2.000 | 0.500 / 1.000 | 2.00x |"
    assert lines[3] == "| 2 | g64 | b16 | int8 | 1 | 1 | 4.000 / 5.000 | 2.000 / 4.000 | 2.00x |"
    assert int((tmp_path / "a.n").read_text()) == 3 and int((tmp_path / "b.n").read_text()) == 3


def test_a_cell_below_the_timer_resolution_has_no_ratio():
    got = ab_kernel_bench.table({("2", "row", "b16", "int8", "1", "1"): {"a": [0.0, 0.001], "b": [0.002, 0.003]},
                                 ("2", "g64", "b16", "int8", "1", "1"): {"a": [0.004], "b": [0.0]}}, ["a", "b"])
    lines = got.splitlines()
    assert lines[2] == "| 2 | row | b16 | int8 | 1 | 1 | 0.000 / 0.001 | 0.002 / 0.003 | n/a (0.000 ms) |"
    assert lines[3] == "| 2 | g64 | b16 | int8 | 1 | 1 | 0.004 / 0.004 | 0.000 / 0.000 | n/a (0.000 ms) |"


def test_parse_rows_reads_only_timing_rows():
    rows = ab_kernel_bench.parse_rows(TABLE.format(a=0.25, b=0.5))
    assert rows == [(("2", "row", "b16", "int8", "1", "1"), 0.25), (("2", "g64", "b16", "int8", "1", "1"), 0.5)]


@pytest.mark.parametrize("args, needle", [
    (["--reps", "0", "x=/bin/true", "y=/bin/true"], "--reps must be >= 1"),
    (["x=/bin/true"], "at least two"),
    (["x", "y=/bin/true"], "'x' is not NAME=PATH"),
    (["x=/nonexistent/bench", "y=/bin/true"], "binary x: /nonexistent/bench is not an executable"),
    (["x=/bin/true", "x=/bin/true"], "name 'x' given twice"),
    (["x=/bin/true", "y=/bin/true"], "x (/bin/true) printed no timing rows"),
    (["x=/bin/false", "y=/bin/true"], "x (/bin/false) exited with 1"),
    (["x=/bin/true", "y=/bin/true", "--", "--decoder", "1,2,3,4"], "--decoder tables are not compared"),
])
def test_bad_input_one_line(args, needle):
    r = _run(*args)
    assert r.returncode == 2
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_real_bench_builds_compared(tmp_path):
    """The real kernel bench, twice (the same build under two names): every cell of the grid appears."""
    pytest.importorskip("executorch")
    from paretoq_ao.export import _build

    bench = str(_build.build_kernels() / _build.BENCH_BINARY)
    r = _run("--reps", "2", f"one={bench}", f"two={bench}", "--", "--bits", "2,1.58", "--groups", "0,64",
             "--m", "1,3", "--modes", "int8", "--k", "1280", "--n", "96", "--cache-mb", "1", "--ms", "2")
    assert r.returncode == 0, r.stderr
    cells = re.findall(r"^\| (\S+) \| (\S+) \| rows \| int8 \| (\d) \| 1 \| [\d.]+ / [\d.]+ \| [\d.]+ / [\d.]+ \| [\d.]+x \|$",
                       r.stdout, re.M)
    assert sorted(cells) == sorted((b, g, m) for b in ("2", "1.58") for g in ("row", "g64") for m in ("1", "3"))
