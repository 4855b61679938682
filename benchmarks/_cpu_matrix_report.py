"""The report half of ``bench_cpu_matrix.py``: per-runtime tables, the ExecuTorch targets, the
results file's text."""

from __future__ import annotations

import sys
from typing import List


def _ms(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _ratio(b, ours) -> str:
    return f"{b / ours:.2f}x" if isinstance(b, float) and isinstance(ours, float) else "n/a"


def table(rows, rt, bw) -> List[str]:
    sel = [r for r in rows if r["runtime"] == rt]
    if not sel:
        return []
    bases = list(sel[0]["base"])
    head = ["runtime", "K x N", "bits", "layout", "acts", "M", "threads", "ours ms"] + [f"{b} ms" for b in bases] + \
           [f"{b}/ours" for b in bases] + ["ours GB/s", "% DRAM", "copies (MiB cycled)", "kernel plan"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sel:
        pct = f"{100 * r['gbs'] / bw[r['threads']]:.0f}%" if r["gbs"] and bw.get(r["threads"]) else "n/a"
        plan = r["plan"] + ("" if r["calls_ok"] else "; WARNING: kernel call count did not match (not our kernel?)")
        cells = [rt, f"{r['k']} x {r['n']}", r["bits"], r["layout"], r["acts"], str(r["m"]), str(r["threads"]),
                 _ms(r["ours"])] + [_ms(r["base"][b]) for b in bases] + \
                [_ratio(r["base"][b], r["ours"]) for b in bases] + \
                [f"{r['gbs']:.1f}" if r["gbs"] else "n/a", pct, f"{r['copies']} ({r['cycled_mb']:.0f})", plan]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _check(name, where, items, thr, higher=True) -> str:
    """PASS/MISS line: every (what, value) must be >= thr (or <= thr); prints the worst value."""
    items = [(w, v) for w, v in items if v is not None]
    if not items:
        return f"n/a   {name} [{where}]: no data"
    ok = [(v >= thr) if higher else (v <= thr) for _, v in items]
    worst = min(items, key=lambda t: t[1]) if higher else max(items, key=lambda t: t[1])
    misses = [f"{w} {v:.3f}x" for (w, v), good in zip(items, ok) if not good]
    cmp = ">=" if higher else "<="
    line = f"{'PASS' if all(ok) else 'MISS'}  {name} [{where}]: worst {worst[0]} {worst[1]:.3f}x (need {cmp} {thr}x)"
    return line + (f"; misses: {', '.join(misses)}" if misses else "")


def targets(rows) -> List[str]:
    """The ExecuTorch targets, per shape x threads x acts."""
    et = [r for r in rows if r["runtime"] == "et" and isinstance(r["ours"], float)]
    out = []
    for key in sorted({(r["k"], r["n"], r["threads"], r["acts"]) for r in et}):
        grp = [r for r in et if (r["k"], r["n"], r["threads"], r["acts"]) == key]
        where = f"et {key[0]}x{key[1]}, {key[2]} thr, {key[3]} acts"

        def r8(r):
            b = r["base"].get("8da4w")
            return b / r["ours"] if isinstance(b, float) else None

        m1 = {(r["bits"], r["layout"]): r for r in grp if r["m"] == 1}
        lab = lambda b, l: f"{b}-bit {l}"  # noqa: E731
        out.append(_check("M=1 every bits x layout >= 1.0x 8da4w", where,
                          [(lab(*k), r8(r)) for k, r in m1.items()], 1.0))
        for b, nm in (("2", "2-bit"), ("1.58", "ternary"), ("3", "3-bit")):
            thr = 1.3 if b == "3" else 1.8
            items = [(lab(*k), r8(r)) for k, r in m1.items() if k[0] == b]
            if items:
                out.append(_check(f"M=1 {nm} >= {thr}x 8da4w", where, items, thr))
        pairs = [(l, m1[("2", l)]["ours"] / m1[("1", l)]["ours"]) for (b, l) in m1 if b == "1" and ("2", l) in m1]
        if pairs:
            out.append(_check("M=1 1-bit at least as fast as 2-bit (2-bit ms / 1-bit ms)", where, pairs, 1.0))
        grp_items = [(lab(b, l), r["ours"] / m1[(b, "row")]["ours"]) for (b, l), r in m1.items()
                     if l != "row" and (b, "row") in m1]
        if grp_items:
            out.append(_check("M=1 group sizes within 1.25x of per-row (group ms / row ms)", where, grp_items, 1.25,
                              higher=False))
        m128 = [(lab(r["bits"], r["layout"]), r8(r)) for r in grp if r["m"] == 128]
        if m128:
            out.append(_check("M=128 >= 1.0x 8da4w at every bit width", where, m128, 1.0))
    return out


def report(a, script, argv, info, bw, rows, notes, date) -> str:
    """The results file of bench_cpu_matrix.py (markdown)."""
    lines = [f"# CPU matrix: one linear layer, ParetoQ vs baselines ({date})", "",
             f"Command: {' '.join([sys.executable, script] + list(argv))}", "",
             f"Machine: {info['cpu']}, {info['cores']} cores; {info['flags']}; L3 {info['l3']}; "
             f"{info['platform']}; ParetoQ kernel path {info['kernel_path']}; load average at start "
             f"{info['load']} (1/5/15 min: other work on the machine skews the times)",
             f"Versions: {info['versions']}; git {info['git']}", "",
             "DRAM read bandwidth (best streaming read of a 1 GiB buffer, the kernel library's loop or torch.sum, "
             "paretoq_ao.export.cpu_backend.read_bandwidth, best of 5, per thread count): " + ", ".join(f"{t} thread(s) {v:.1f} GB/s" for t, v in bw.items()), "",
             f"Method: every variant cycles >= 3 x L3 = {3 * a.l3_mb:g} MiB through independent copies (et: separate "
             f".pte files loaded as separate programs; pt: deep-copied modules), capped at {a.max_copies} copies; each "
             "call uses the next copy. One block = one bit width (all its layouts x acts) + the baselines at one "
             "shape, "
             f"M and thread count, interleaved in one loop (order rotated each iteration), {a.iters} timed calls per "
             "variant after a warm pass over every copy. Times: median ms per call. Ratios: baseline ms / ours ms "
             "(>1: ours faster). GB/s: (packed weight + scale bytes) / our time; % DRAM: of the bandwidth above "
             "at the same thread count. Kernel plan: paretoq_ao.export.cpu_backend.plan for the row's arguments (the "
             "ExecuTorch and ATen registrations share the C++ linear()); plans saying scalar are flagged SLOW "
             "PATH.", ""]
    if a.quick:
        lines += ["NOTE: --quick caps the copies: layers stay cache-resident, not a DRAM measurement.", ""]
    lines += ["Baselines:"] + [f"- {n}" for n in notes] + [""]
    for rt, title in (("et", "ExecuTorch (executorch.runtime)"), ("pt", "Eager PyTorch CPU")):
        t = table(rows, rt, bw)
        if t:
            lines += [f"## {title}", ""] + t + [""]
    tg = targets(rows)
    if tg:
        lines += ["## Targets (ExecuTorch, ratios vs torchao 8da4w at the same layout)", ""] + \
                 [f"- {t}" for t in tg] + [""]
    return "\n".join(lines)
