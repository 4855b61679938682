"""The numbers behind ``pareto_study.py``'s verdicts: per-cell means and spreads over the seeds, paired
differences with a 95 % confidence interval, the findings lines and the paper's claims.

Every run of the study writes one row per (size, bits, method, seed) with the held-out perplexity on
each corpus (``ppl``: the stdlib validation split, ``ppl2``: the second corpus). ``aggregate`` turns
them into one cell per (size, bits, method): the mean, the sample standard deviation and the
per-seed values. Two cells are compared seed by seed (``paired``: the same seed means the same FP
pre-training and QAT batch order): the mean difference and a Student-t 95 % interval over the seeds.
A claim counts as *decided* only when that interval excludes zero; a difference whose interval holds
zero is reported as "within the seed noise", whatever its sign. With one seed nothing is decided.
"""

from __future__ import annotations

import math
import statistics
from typing import Dict, List, Optional

# two-sided 95 % Student-t quantiles by degrees of freedom (n seeds - 1)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
LOW_BITS = (2, 1.58, 1)  # where the paper's gap to FP is largest, and distillation's target


# --------------------------------------------------------------------------- statistics

def mean_sd(xs) -> tuple:
    """(mean, sample standard deviation; 0 for one value)."""
    xs = list(xs)
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _t95(n: int) -> float:
    return T95.get(n - 1, 1.96) if n > 1 else math.inf


def paired(a: Dict[int, float], b: Dict[int, float]) -> Optional[Dict]:
    """a - b seed by seed over their common seeds: n, mean, sd, the 95 % interval (lo, hi) and how many seeds
    have a < b. None when they share no seed."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    m, sd = mean_sd(d)
    half = _t95(len(d)) * sd / math.sqrt(len(d)) if len(d) > 1 else math.inf
    return dict(n=len(d), mean=m, sd=sd, lo=m - half, hi=m + half, lower=sum(x < 0 for x in d))


def lower_verdict(diff: Optional[Dict]) -> str:
    """Whether a is lower than b, from ``paired(a, b)``: "lower" / "higher" (decided), or "within noise"."""
    if diff is None:
        return "not run"
    if diff["hi"] < 0:
        return "lower"
    if diff["lo"] > 0:
        return "higher"
    return "within noise"


def fmt_diff(diff: Optional[Dict], unit: str = "") -> str:
    if diff is None:
        return "n/a"
    if diff["n"] < 2:
        return f"{diff['mean']:+.2f}{unit} (1 seed)"
    return (f"{diff['mean']:+.2f}{unit}, 95 % CI [{diff['lo']:+.2f}, {diff['hi']:+.2f}], lower in {diff['lower']} "
            f"of {diff['n']} seeds")


def aggregate(rows: List[Dict], key: str = "ppl", group=("size", "bits", "method")) -> List[Dict]:
    """One cell per ``group`` (first-appearance order): the first row's other fields, plus ``ppl`` (the mean of
    ``key`` over the seeds; None when no seed has a value), ``sd``, ``n`` and ``seeds`` {seed: value}."""
    cells: Dict[tuple, Dict] = {}
    for r in rows:
        k = tuple(r[g] for g in group)
        c = cells.setdefault(k, dict({f: v for f, v in r.items() if f not in ("ppl", "ppl2", "seed")}, seeds={}))
        v = r.get(key)
        if v is not None and math.isfinite(v):
            c["seeds"][r.get("seed", 0)] = v
    for c in cells.values():
        vals = list(c["seeds"].values())
        c["ppl"], c["sd"] = mean_sd(vals) if vals else (None, None)
        c["n"] = len(vals)
    return list(cells.values())


def cell_lookup(cells: List[Dict]):
    """get(size, bits, method) -> the cell, or None."""
    index = {(c["size"], c["bits"], c["method"]): c for c in cells}
    return lambda size, bits, method: index.get((size, bits, method))


def fmt_cell(c: Optional[Dict]) -> str:
    if c is None or c["ppl"] is None:
        return "n/a"
    return _fmt(c["ppl"]) if c["n"] < 2 else f"{_fmt(c['ppl'])} ± {_fmt(c['sd'])}"


# --------------------------------------------------------------------------- findings (on the cell means)

def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4g}" if v >= 1e4 else f"{v:.2f}"


def _pct(a, b) -> str:
    return f"{100 * (a / b - 1):+.1f} %"


def _ppl_lookup(rows):
    """get(size, bits, method) -> the row's perplexity, or None when there is no such row."""
    def get(size, bits, method):
        return next((r["ppl"] for r in rows if r["size"] == size and r["bits"] == bits and r["method"] == method),
                    None)

    return get


def _findings_per_size(get, args) -> List[str]:
    """One line per size: 4/3-bit QAT vs FP, and QAT vs RTN at 2/1.58/1 bits."""
    out = []
    for size in args.sizes:
        fp = get(size, None, "FP")
        parts = []
        for b in (4, 3):
            q = get(size, b, "ParetoQ QAT")
            if q is not None:
                parts.append(f"{b}-bit ParetoQ QAT {_pct(q, fp)} vs FP")
        for b in (2, 1.58, 1):
            q, r = get(size, b, "ParetoQ QAT"), get(size, b, "RTN")
            if q is not None and r is not None:
                parts.append(f"{b:g}-bit QAT {_fmt(q)} vs RTN {_fmt(r)} ({_pct(q, fp)} vs FP; RTN/QAT ppl ratio {r / q:.2f})")
        out.append(f"**{size}** (FP ppl {_fmt(fp)}): " + "; ".join(parts) + ".")
    return out


def _findings_size_scaling(get, args) -> List[str]:
    """Whether FP perplexity falls with model size, and the size gain vs the 4 -> 2 bit cost."""
    out = []
    fps = [(s, get(s, None, "FP")) for s in args.sizes]
    if len(fps) > 1:
        mono = all(fps[i][1] > fps[i + 1][1] for i in range(len(fps) - 1))
        out.append("FP perplexity " + ("falls" if mono else "does NOT fall") + " with model size ("
                   + ", ".join(f"{s} {_fmt(v)}" for s, v in fps) + ")"
                   + (" under the per-size pre-training LR rule with warm-up (one LR of 3e-3 without warm-up "
                      "for every size made s worse than xs; see the pre-training sweep below)" if mono else
                      ": the larger model ends worse with these pre-training settings, so cross-size comparisons "
                      "(the paper's 'lower bits on a bigger model' trade-off) are not meaningful here; see the "
                      "pre-training sweep below")
                   + ".")
        steps = [f"{fps[i][0]}->{fps[i + 1][0]} {_pct(fps[i + 1][1], fps[i][1])}" for i in range(len(fps) - 1)]
        cost = [(s, get(s, 4, "ParetoQ QAT"), get(s, 2, "ParetoQ QAT")) for s in args.sizes]
        cost = [f"{s} {_pct(q2, q4)}" for s, q4, q2 in cost if q4 is not None and q2 is not None]
        if cost:
            out.append("Size gain vs bit cost: FP ppl per size step " + ", ".join(steps) + "; ParetoQ QAT ppl from "
                       "4 to 2 bits " + ", ".join(cost) + ". A bigger model at fewer bits can only win at equal "
                       "bytes where the size gain outweighs the bit cost.")
    return out


def _findings_bit_order(get, args) -> List[str]:
    """Per size: does ParetoQ QAT perplexity rise monotonically as the bit width falls?"""
    out = []
    for size in args.sizes:
        q = [(b, get(size, b, "ParetoQ QAT")) for b in sorted(args.bits, reverse=True)]
        q = [(b, v) for b, v in q if v is not None]
        mono = all(q[i][1] <= q[i + 1][1] for i in range(len(q) - 1))
        out.append(f"**{size}**: ParetoQ QAT perplexity {'rises monotonically' if mono else 'does NOT rise monotonically'}"
                   f" as bits fall ({', '.join(f'{b:g}b {_fmt(v)}' for b, v in q)}).")
    return out


def _findings_baselines(get, args) -> List[str]:
    """ParetoQ QAT vs RTN and vs torchao QAT, cell by cell."""
    wins = [(s, b) for s in args.sizes for b in args.bits
            if get(s, b, "ParetoQ QAT") is not None and get(s, b, "RTN") is not None
            and get(s, b, "ParetoQ QAT") < get(s, b, "RTN")]
    n = sum(1 for s in args.sizes for b in args.bits if get(s, b, "RTN") is not None)
    out = [f"ParetoQ QAT beats RTN in {len(wins)} of {n} (size, bits) cells."]
    cmp = [(s, b, get(s, b, "ParetoQ QAT"), get(s, b, "torchao QAT")) for s in args.sizes for b in args.bits
           if get(s, b, "torchao QAT") is not None]
    if cmp:
        better = [c for c in cmp if c[2] < c[3]]
        detail = "; ".join(f"{s} {b:g}b {_fmt(p)} vs {_fmt(t)}" for s, b, p, t in cmp)
        out.append(f"ParetoQ QAT vs torchao QAT (same bits, budget, LR, batches): ParetoQ lower in {len(better)} of "
                   f"{len(cmp)} cells ({detail}).")
    return out


def _findings_tradeoff(rows, args) -> List[str]:
    """The size-vs-perplexity frontier and the bigger-model-at-fewer-bits pairs at no more bytes."""
    qpts = [r for r in rows if r["method"] == "ParetoQ QAT" and r["ppl"] is not None]
    front = sorted(qpts, key=lambda r: (r["linear_mb"], r["ppl"]))
    best, frontier = float("inf"), []
    for r in front:
        if r["ppl"] < best:
            best = r["ppl"]
            frontier.append(f"{r['size']}/{r['bits']:g}b")
    out = ["ParetoQ QAT size-vs-perplexity frontier over all sizes (smallest bytes first): "
           + ", ".join(frontier) + "."]
    # the paper's trade-off: a bigger model at fewer bits vs a smaller model at more bits
    order = {s: i for i, s in enumerate(args.sizes)}
    dom = []
    for big in qpts:
        for small in qpts:
            if (order[big["size"]] > order[small["size"]] and big["bits"] < small["bits"]
                    and big["linear_mb"] <= small["linear_mb"]):
                dom.append((big, small, big["ppl"] < small["ppl"]))
    if dom:
        won = [d for d in dom if d[2]]
        out.append("Bigger model at fewer bits vs smaller model at more bits, at no more stored bytes: the bigger "
                   f"one is better in {len(won)} of {len(dom)} such pairs ("
                   + "; ".join(f"{b['size']}/{b['bits']:g}b {b['linear_mb']:.3f} MB ppl {_fmt(b['ppl'])} "
                               f"{'<' if w else '>='} {a['size']}/{a['bits']:g}b {a['linear_mb']:.3f} MB ppl "
                               f"{_fmt(a['ppl'])}" for b, a, w in dom) + ").")
    elif len(args.sizes) > 1:
        out.append("No larger-model/fewer-bits point stores as few bytes as a smaller-model/more-bits point, so "
                   "the bigger-model-at-fewer-bits trade-off is not tested by these sizes.")
    return out


def _findings_ablations(abl) -> List[str]:
    """The SEQ-vs-LSQ grid ablation and the budget-split ablation (first size)."""
    out = []
    grid = [a for a in abl if a["study"] == "grid"]
    for b in (2, 1.58):
        g = {a["variant"].split()[0]: a["ppl"] for a in grid if a["bits"] == b}
        if len(g) == 2:
            w = "SEQ" if g["SEQ"] < g["LSQ"] else "LSQ"
            out.append(f"Grid ablation {b:g}-bit ({grid[0]['size']}): SEQ {_fmt(g['SEQ'])} vs LSQ {_fmt(g['LSQ'])}"
                       f" -> {w} lower.")
    split = [a for a in abl if a["study"] == "split"]
    if split:
        best = min(split, key=lambda a: a["ppl"])
        out.append("Budget split at 2 bits (fixed total): " + ", ".join(f"{a['variant'].split()[0]} {_fmt(a['ppl'])}"
                                                                      for a in split)
                   + f" -> best {best['variant'].split()[0]}.")
    return out


def _caveats(n_seeds: int) -> str:
    seeds = ("one seed; differences of a few percent are within what a different seed could change" if n_seeds < 2
             else f"{n_seeds} seeds; these lines compare cell means, the claims above say which differences "
                  "exceed the seed noise")
    return (f"Caveats: {seeds}; tiny models (<1M-few M parameters) trained for minutes on Python source, not the "
            "paper's billion-parameter / billion-token regime. Nothing here tests the paper's zero-shot accuracies.")


def findings(res, args, key: str = "ppl") -> List[str]:
    """The 'what reproduces / what does not' lines of the Markdown, computed from the cell means of ``key``."""
    rows = aggregate(res["rows"], key)
    abl = aggregate(res["ablation"], key, ("study", "size", "bits", "variant"))
    get = _ppl_lookup(rows)
    n = max((c["n"] for c in rows), default=1)
    return (_findings_per_size(get, args) + _findings_size_scaling(get, args) + _findings_bit_order(get, args)
            + _findings_baselines(get, args) + _findings_tradeoff(rows, args) + _findings_ablations(abl)
            + [_caveats(n)])



# --------------------------------------------------------------------------- the paper's claims, with the spread

DISTILL = "ParetoQ QAT + distill"
DISTILL_TARGET_PCT = 25.0


def _verdict(n_yes: int, n: int) -> str:
    return "reproduces" if n and n_yes == n else "partly reproduces" if n_yes else "does NOT reproduce"


def _gap_pct(get, size, bits, fp) -> Optional[tuple]:
    """(mean, sd, n) of 100 * (QAT / FP - 1) over the seeds both have."""
    q = get(size, bits, "ParetoQ QAT")
    if q is None or fp is None or not q["seeds"]:
        return None
    g = [100 * (q["seeds"][s] / fp["seeds"][s] - 1) for s in sorted(set(q["seeds"]) & set(fp["seeds"]))]
    return mean_sd(g) + (len(g),) if g else None


def _claim_near_fp(get, args, close_pct: float) -> Optional[str]:
    parts, verdicts, within2 = [], [], []
    for b in (4, 3):
        ok = n = 0
        for s in args.sizes:
            g = _gap_pct(get, s, b, get(s, None, "FP"))
            if g is None:
                continue
            n += 1
            ok += g[0] <= close_pct
            parts.append(f"{s} {b}b {g[0]:+.1f} ± {g[1]:.1f} %")
            if b == 4 and g[0] <= 2.0:
                within2.append(s)
        if n:
            verdicts.append(f"{b}-bit {_verdict(ok, n)}")
    if not parts:
        return None
    return (f"3/4-bit QAT close to FP (here: the mean ParetoQ QAT ppl within {close_pct:g} % of FP at every size): "
            + ", ".join(verdicts) + " (" + ", ".join(parts) + "; mean ± sd over the seeds). 4-bit within 2 % of FP "
            "at: " + (", ".join(within2) or "no size") + ".")


def _frontier(cells) -> List[Dict]:
    pts = sorted((c for c in cells if c["method"] == "ParetoQ QAT" and c["ppl"] is not None),
                 key=lambda c: (c["linear_mb"], c["ppl"]))
    best, front = math.inf, []
    for c in pts:
        if c["ppl"] < best:
            best = c["ppl"]
            front.append(c)
    return front


def _claim_front(cells, get, args) -> Optional[str]:
    front = _frontier(cells)
    if len(args.sizes) < 2 or not front:
        return None
    fps = [get(s, None, "FP") for s in args.sizes]
    steps = [lower_verdict(paired(fps[i + 1]["seeds"], fps[i]["seeds"])) for i in range(len(fps) - 1)]
    mono = all(fps[i]["ppl"] > fps[i + 1]["ppl"] for i in range(len(fps) - 1))
    low = [c for c in front if c["bits"] in (2, 1.58)]
    verdict = ("reproduces" if mono and len({c["size"] for c in low}) > 1 else
               "partly reproduces" if low else "does NOT reproduce")
    return ("2-bit and ternary on the size-vs-perplexity Pareto front (frontier of the cell means over all sizes; "
            "'reproduces' when 2/1.58-bit points of more than one size are on it and FP ppl falls with size): "
            f"{verdict} (frontier " + ", ".join(f"{c['size']}/{c['bits']:g}b" for c in front)
            + "; FP ppl by size " + ", ".join(f"{s} {fmt_cell(c)}" for s, c in zip(args.sizes, fps))
            + "; each size vs the one before: " + ", ".join(steps)
            + "; ternary is stored at 1.6 bits per weight, 5 codes per byte).")


def _claim_byte_matched(cells, args) -> Optional[str]:
    order = {s: i for i, s in enumerate(args.sizes)}
    q = [c for c in cells if c["method"] == "ParetoQ QAT" and c["ppl"] is not None]
    pairs = [(b, a) for b in q for a in q if order[b["size"]] > order[a["size"]] and b["bits"] < a["bits"]
             and b["linear_mb"] <= a["linear_mb"]]
    if not pairs:
        return ("Byte-matched: no bigger-model/fewer-bits point stores as few bytes as a smaller-model/more-bits "
                "point, so the comparison is not tested by these sizes." if len(args.sizes) > 1 else None)
    vs = [(b, a, paired(b["seeds"], a["seeds"])) for b, a in pairs]
    won = sum(lower_verdict(d) == "lower" for *_, d in vs)
    lost = sum(lower_verdict(d) == "higher" for *_, d in vs)
    verdict = ("reproduces" if 2 * won > len(vs) else "does NOT reproduce" if 2 * lost > len(vs)
               else "undecided (within the seed noise)" if won + lost < len(vs) else "mixed")
    return ("Byte-matched: a bigger model at fewer bits beats a smaller one at more bits that stores at least as "
            f"many bytes: {verdict} (bigger one lower in {won}, higher in {lost}, within noise in "
            f"{len(vs) - won - lost} of {len(vs)} pairs: "
            + "; ".join(f"{b['size']}/{b['bits']:g}b {b['linear_mb']:.3f} MB vs {a['size']}/{a['bits']:g}b "
                        f"{a['linear_mb']:.3f} MB: {fmt_diff(d)}" for b, a, d in vs) + ").")


def _claim_seq_lsq(abl) -> Optional[str]:
    grid = {(c["bits"], c["variant"].split()[0]): c for c in abl if c["study"] == "grid"}
    vs = [(b, grid[(b, "SEQ")], grid[(b, "LSQ")]) for b in (2, 1.58) if (b, "SEQ") in grid and (b, "LSQ") in grid]
    if not vs:
        return None
    got = [lower_verdict(paired(s["seeds"], l["seeds"])) for _, s, l in vs]
    verdict = ("reproduces" if all(g == "lower" for g in got) else
               "does NOT reproduce" if all(g == "higher" for g in got) else
               "partly reproduces" if "lower" in got else "undecided (within the seed noise)")
    return (f"SEQ beats LSQ at <= 2 bits ({vs[0][1]['size']}): {verdict} ("
            + "; ".join(f"{b:g}b SEQ {fmt_cell(s)} vs LSQ {fmt_cell(l)}, SEQ - LSQ "
                        f"{fmt_diff(paired(s['seeds'], l['seeds']))}" for b, s, l in vs) + ").")


def distill_gain(get, size, bits) -> Optional[Dict]:
    """Distillation at (size, bits) over the seeds all three cells share: ``closed`` = 100 x mean(plain -
    distilled) / mean(plain - FP), the share of the plain-QAT-to-FP gap it closes (a ratio of means: per-seed
    ratios explode where the gap is near zero), with ``closed_lo`` / ``closed_hi`` = the 95 % interval of the
    paired ppl difference over that same mean gap; ``diff`` = paired(distilled, plain). ``closed`` is None
    where the mean gap is not positive (nothing to close)."""
    plain, dist, fp = get(size, bits, "ParetoQ QAT"), get(size, bits, DISTILL), get(size, None, "FP")
    if plain is None or dist is None or fp is None or not dist["seeds"]:
        return None
    seeds = sorted(set(plain["seeds"]) & set(dist["seeds"]) & set(fp["seeds"]))
    if not seeds:
        return None
    gap = mean_sd([plain["seeds"][s] - fp["seeds"][s] for s in seeds])[0]
    diff = paired({s: dist["seeds"][s] for s in seeds}, {s: plain["seeds"][s] for s in seeds})
    out = dict(closed=None, closed_lo=None, closed_hi=None, gap=gap, n=len(seeds), diff=diff, plain=plain, dist=dist)
    if gap > 0:
        out.update(closed=-100 * diff["mean"] / gap, closed_lo=-100 * diff["hi"] / gap, closed_hi=-100 * diff["lo"] / gap)
    return out


def fmt_closed(g: Dict) -> str:
    if g["closed"] is None:
        return "no gap"
    if g["n"] < 2:
        return f"{g['closed']:.0f} % (1 seed)"
    return f"{g['closed']:.0f} % [{g['closed_lo']:.0f}, {g['closed_hi']:.0f}]"


def _claim_distill(get, args) -> Optional[str]:
    parts, met, missed = [], [], []
    for b in args.bits:
        for s in args.sizes:
            g = distill_gain(get, s, b)
            if g is None:
                continue
            v = lower_verdict(g["diff"])
            parts.append(f"{s} {b:g}b {fmt_closed(g)} ({v})")
            if b in LOW_BITS:
                ok = g["closed"] is not None and g["closed"] >= DISTILL_TARGET_PCT and v == "lower"
                (met if ok else missed).append(f"{s}/{b:g}b")
    if not parts:
        return None
    return ("What distillation buys (share of the plain-QAT-to-FP ppl gap closed at the same token budget, "
            "mean [95 % interval]; 'lower' = distilled ppl lower with the interval excluding zero): "
            + ", ".join(parts) + f". Target (>= {DISTILL_TARGET_PCT:g} % closed at 1, 1.58 and 2 bits, larger than "
            "the noise): met at " + (", ".join(met) or "none") + "; missed at " + (", ".join(missed) or "none") + ".")


def _claim_split(abl) -> Optional[str]:
    split = [c for c in abl if c["study"] == "split"]
    main = next((c for c in split if c["variant"].startswith("90/10")), None)
    if main is None:
        return None
    others = [(c, lower_verdict(paired(main["seeds"], c["seeds"]))) for c in split if c is not main]
    verdict = ("reproduces" if all(v == "lower" for _, v in others) else
               "does NOT reproduce" if any(v == "higher" for _, v in others) else "undecided (within the seed noise)")
    return (f"90/10 FP/QAT split best of 90/10, 70/30, 100/0 ({main['size']}, 2-bit): {verdict} (90/10 "
            f"{fmt_cell(main)}; " + "; ".join(f"{c['variant'].split()[0]} {fmt_cell(c)}: 90/10 {v}"
                                              for c, v in others) + ").")


def claims(res, args, key: str = "ppl", close_pct: float = 5.0) -> List[str]:
    """One verdict line per paper claim on corpus ``key``, computed from the per-seed numbers."""
    cells = aggregate(res["rows"], key)
    abl = aggregate(res["ablation"], key, ("study", "size", "bits", "variant"))
    get = cell_lookup(cells)
    out = [_claim_near_fp(get, args, close_pct), _claim_front(cells, get, args), _claim_byte_matched(cells, args),
           _claim_seq_lsq(abl), _claim_distill(get, args), _claim_split(abl)]
    return [c for c in out if c]
