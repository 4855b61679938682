"""A/B of two (or more) builds of the C++ kernel microbenchmark, run alternately on one machine.

    python benchmarks/ab_kernel_bench.py --reps 3 before=/tmp/a/paretoq_kernel_bench after=/tmp/b/paretoq_kernel_bench \\
        -- --bits 2,4 --groups 0,64 --m 1 --modes int8 --orders b16 --cache-mb 8

Each rep runs every binary once with the same arguments (after ``--``), in the order given, so slow
phases of a noisy machine hit them all; a cell's figure per binary is the minimum and the median of
its per-run medians. Prints one markdown table: the cell, "min / median ms" per binary and the
speed-up of every binary against the first (by the minima). Build a binary of another commit with
``cmake -S export -B DIR -DPARETOQ_WITH_EXECUTORCH=OFF && cmake --build DIR --target paretoq_kernel_bench``
on a checkout of that commit (``git archive <commit> export | tar -x -C SRC``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from typing import Dict, List, Tuple

PROG = "ab_kernel_bench.py"
KEY_COLUMNS = 6  # bits, layout, order, acts, M, threads (after the path column of the bench table)


def _fail(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def parse_rows(text: str) -> List[Tuple[Tuple[str, ...], float]]:
    """(cell key, ms) of every data row of one paretoq_kernel_bench single-layer table."""
    rows = []
    for line in text.splitlines():
        f = [x.strip() for x in line.strip().strip("|").split("|")]
        if len(f) < KEY_COLUMNS + 2 or not f[KEY_COLUMNS + 1][:1].isdigit():
            continue  # header, separator, or a "not available" line
        rows.append((tuple(f[1:KEY_COLUMNS + 1]), float(f[KEY_COLUMNS + 1])))
    return rows


def table(results: Dict[Tuple[str, ...], Dict[str, List[float]]], names: List[str]) -> str:
    head = "| bits | layout | order | acts | M | threads | " + " | ".join(f"{n} ms (min / median)" for n in names)
    head += "".join(f" | {n} vs {names[0]}" for n in names[1:]) + " |"
    lines = [head, "|" + "---|" * (KEY_COLUMNS + 2 * len(names) - 1)]
    for key, per in results.items():
        mins = [min(per[n]) for n in names]
        cells = [f"{min(per[n]):.3f} / {statistics.median(per[n]):.3f}" for n in names]
        # a cell faster than the bench prints (0.000 ms) has no ratio: say so instead of dividing by zero
        cells += [f"{mins[0] / m:.2f}x" if m > 0 and mins[0] > 0 else "n/a (0.000 ms)" for m in mins[1:]]
        lines.append("| " + " | ".join(list(key) + cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, bench_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="alternating runs of every binary (>= 1)")
    ap.add_argument("binaries", nargs="+", metavar="NAME=PATH", help="two or more paretoq_kernel_bench builds")
    a = ap.parse_args(argv)
    if a.reps < 1:
        _fail(f"--reps must be >= 1, got {a.reps}")
    if len(a.binaries) < 2:
        _fail("give at least two NAME=PATH binaries to compare")
    names, paths = [], []
    for b in a.binaries:
        name, sep, path = b.partition("=")
        if not sep or not name or not path:
            _fail(f"binary {b!r} is not NAME=PATH")
        if not os.access(path, os.X_OK):
            _fail(f"binary {name}: {path} is not an executable file")
        if name in names:
            _fail(f"binary name {name!r} given twice")
        names.append(name)
        paths.append(path)
    if "--decoder" in bench_args:
        _fail("--decoder tables are not compared here (single-layer cells only)")
    results: Dict[Tuple[str, ...], Dict[str, List[float]]] = {}
    for _ in range(a.reps):
        for name, path in zip(names, paths):
            r = subprocess.run([path, *bench_args], capture_output=True, text=True)
            if r.returncode != 0:
                _fail(f"{name} ({path}) exited with {r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}")
            rows = parse_rows(r.stdout)
            if not rows:
                _fail(f"{name} ({path}) printed no timing rows")
            for key, ms in rows:
                results.setdefault(key, {}).setdefault(name, []).append(ms)
    for key, per in results.items():
        missing = [n for n in names if n not in per]
        if missing:
            _fail(f"cell {' '.join(key)} has no timing from {', '.join(missing)}")
    print(table(results, names))


if __name__ == "__main__":
    main()
