"""The whole CPU matrix for ONE linear layer, side by side in one run: ParetoQ (our C++ kernels)
vs the baselines a user could pick instead, in ExecuTorch (``et``) and eager PyTorch (``pt``).

    python benchmarks/bench_cpu_matrix.py                      # full matrix (tens of minutes)
    python benchmarks/bench_cpu_matrix.py --shapes 4096x4096 --bits 2,4 --layouts row,g64 --m 1 --threads 1
    python benchmarks/bench_cpu_matrix.py --quick              # tiny smoke run (the test)

Rows: runtime x K x N (K = in_features, N = out_features) x bits {1, 1.58, 2, 3, 4} x scale layout
{row, g32, g64, g128, g256} x activations {int8 (paretoq::linear_8da), float (paretoq::linear)} x
M {1, 8, 128} x threads {1, 2}.

* et: our .pte (``export_executorch(..., activations=)``) vs XNNPACK fp32 vs torchao 8da4w
  (``Int8DynamicActivationIntxWeightConfig(int4)``) lowered to XNNPACK at the row's group size
  (per-row rows: per-channel ``PerAxis(0)`` if it lowers, else group 32; the notes say which).
* pt: our packed layer (``F.linear`` -> the C++ backend) vs fp32 ``nn.Linear`` vs torchao's own
  eager options at 4 bits (8da4w group 32, ``Int4WeightOnlyConfig(group_size=32)``) as they run here.

Timing: every variant keeps enough independent copies (separate .pte files loaded as separate
programs / deep-copied modules) that the bytes it cycles exceed 3 x L3 (``--l3-mb``); each timed
call uses the next copy. The variants of one block (all layouts and activation modes of one bit
width, plus the baselines, at one shape / M / thread count) are interleaved in one loop, in an
order rotated every iteration, so machine noise hits them equally. Reported: medians of per-call ms.
The DRAM read bandwidth is measured per thread count in the same run; "GB/s" = (packed weight +
scale bytes) / time. Ratios are baseline time / our time (>1: we are faster). Results are printed
and written (atomically) to benchmarks/results/cpu-matrix-<date>.md (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import importlib.metadata
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from _cpu_matrix_report import _ms, report  # benchmarks/_cpu_matrix_report.py
from _meta import cpu_model, dram_bandwidth, git_commit, results_path, write_text  # benchmarks/_meta.py (this folder is sys.path[0])

HERE = os.path.dirname(os.path.abspath(__file__))
LAYOUTS = {"row": None, "g32": 32, "g64": 64, "g128": 128, "g256": 256}
BITS = ("1", "1.58", "2", "3", "4")


# ----------------------------------------------------------------------------- small helpers

@dataclasses.dataclass
class Variant:
    """One thing timed in a block: its copies (callables), bytes per copy, or why it is n/a."""
    name: str
    fns: List[Callable] = dataclasses.field(default_factory=list)
    nbytes: int = 0
    error: Optional[str] = None
    label: str = ""  # what it is (e.g. "8da4w per-channel")
    times: List[float] = dataclasses.field(default_factory=list)


def _reason(e: BaseException) -> str:
    msg = (str(e).strip().splitlines() or [""])[0]
    msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg.replace("|", "/")[:160]


def _bits_value(b: str) -> float:
    return 1.58 if b == "1.58" else int(b)


def _n_copies(nbytes: int, a) -> int:
    """Copies so that copies x nbytes > 3 x L3 (capped by --max-copies)."""
    need = math.ceil(3 * a.l3_mb * (1 << 20) / max(nbytes, 1))
    return max(1, min(a.max_copies, need))


def _l3_mb_default() -> float:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            s = f.read().strip().upper()
    except OSError:
        return 32.0
    mult = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}.get(s[-1:], None)
    try:
        return float(s[:-1]) * mult if mult else float(s) / (1 << 20)
    except ValueError:
        return 32.0


@contextlib.contextmanager
def _quiet():
    """Silence the Future/UserWarnings torch.export and torchao print while lowering (here only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _random_linear(k: int, n: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=False).eval()


def _module_nbytes(m: nn.Module) -> int:
    """Bytes a call reads: the data tensors of the weight (tensor subclasses: their inner tensors)."""
    w = m.weight
    names = list(getattr(w, "tensor_data_names", []) or []) + list(getattr(w, "optional_tensor_data_names", []) or [])
    if not names:
        return w.numel() * w.element_size()
    total = 0
    for name in names:
        t = getattr(w, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def _ours(base: nn.Linear, bits: str, layout: str, acts: str) -> nn.Linear:
    from torchao import quantize_

    from paretoq_ao import ParetoQWeightOnlyConfig
    m = copy.deepcopy(base)
    quantize_(m, ParetoQWeightOnlyConfig(bits=_bits_value(bits), group_size=LAYOUTS[layout], activations=acts),
              filter_fn=lambda mod, fqn: True)
    return m


def _plan(x, w, acts: str) -> str:
    from paretoq_ao.export import cpu_backend
    try:
        p = cpu_backend.plan(x, w.qdata, w.scale, w.bits, acts == "int8")
    except RuntimeError as e:  # the C++ library is unavailable here
        return f"n/a ({_reason(e)})"
    return f"SLOW PATH: {p}" if p.startswith("scalar") else p


# ----------------------------------------------------------------------------- machine

def machine_info(a) -> Dict[str, str]:
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    cpu = cpu_model()
    import paretoq_ao.export as pe
    try:
        path = pe.kernel_path()
    except (RuntimeError, OSError) as e:
        path = f"n/a ({_reason(e)})"
    ver = {}
    for pkg in ("torch", "executorch", "torchao"):
        try:
            ver[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            ver[pkg] = "not installed"
    return {
        "cpu": cpu, "cores": str(os.cpu_count()),
        "flags": ", ".join(f"{fl} {'yes' if fl in flags else 'no'}" for fl in ("avx2", "avx512_vnni", "avx512_vbmi2")),
        "l3": f"{a.l3_mb:g} MiB", "kernel_path": path, "platform": platform.platform(),
        "versions": ", ".join(f"{k} {v}" for k, v in ver.items()), "git": git_commit() or "unknown",
        "load": " / ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
    }


# ----------------------------------------------------------------------------- timing

def _call_ok(v: Variant, fn, x) -> bool:
    try:
        fn(x)
    except RuntimeError as e:  # a program / kernel that fails at this M: the cell says why
        v.error = f"failed at M={x.shape[0]}: {_reason(e)}"
        return False
    return True


def time_block(variants: List[Variant], x: torch.Tensor, iters: int) -> Dict[str, float]:
    """Median ms per call of each live variant; all variants interleaved in one loop (order rotated
    every iteration), each call on the next copy. A warm pass first calls every copy once at this M
    (page faults, delegate set-up for this shape)."""
    with torch.inference_mode():
        live = [v for v in variants if v.error is None]
        live = [v for v in live if all(_call_ok(v, fn, x) for fn in v.fns)]
        for v in live:
            v.times = []
        for it in range(iters):
            k = it % max(len(live), 1)
            for v in live[k:] + live[:k]:
                fn = v.fns[it % len(v.fns)]
                t0 = time.perf_counter()
                fn(x)
                v.times.append(time.perf_counter() - t0)
    return {v.name: statistics.median(v.times) * 1e3 for v in live if v.times}


# ----------------------------------------------------------------------------- ExecuTorch

def _dyn(a):
    return ({0: torch.export.Dim("m", min=1, max=max(a.m + [2]))},)


def _file_copies(path: str, n: int) -> List[str]:
    """n separate files with the same program: separate page-cache pages, separate loaded programs."""
    paths = [path]
    for i in range(1, n):
        p = f"{path[:-4]}.copy{i}.pte"
        shutil.copyfile(path, p)
        paths.append(p)
    return paths


def _et_8da4w(base, layout, x, path, ds):
    """torchao 8da4w at this layout lowered to XNNPACK: (label, error)."""
    import paretoq_ao.export as pe
    from torchao import quantize_
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, PerGroup
    if layout == "row":
        tries = [("per-channel", PerAxis(0)), ("g32", PerGroup(32))]
    else:
        tries = [(layout, PerGroup(LAYOUTS[layout]))]
    errors = []
    for label, gran in tries:
        m = copy.deepcopy(base)
        try:
            with _quiet():
                quantize_(m, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=gran))
                pe.export_executorch(m, (x,), path, dynamic_shapes=ds)  # no packed layer: all XNNPACK
        except Exception as e:  # third-party quantize/export/lowering: any failure becomes the cell text
            errors.append(f"{label}: {_reason(e)}")
            continue
        desc = "PerAxis(0), per-channel" if label == "per-channel" else f"PerGroup({label[1:]})"
        fallback = f"; per-channel did not lower: {errors[0]}" if errors else ""
        return f"torchao 8da4w (Int8DynamicActivationIntxWeightConfig int4, {desc}) on XNNPACK{fallback}", None
    return "", "; ".join(errors)


def et_baselines(base, shape, a, tmp) -> List[dict]:
    """Specs (name, paths, nbytes, label, error) of XNNPACK fp32 and 8da4w per layout."""
    import paretoq_ao.export as pe

    k, n = shape
    x = torch.randn(2, k)
    ds = _dyn(a)
    specs = []
    path = os.path.join(tmp, f"fp32-{k}x{n}.pte")
    try:
        with _quiet():
            pe.export_executorch(copy.deepcopy(base), (x,), path, dynamic_shapes=ds)
        nb = os.path.getsize(path)
        specs.append(dict(name="fp32", paths=_file_copies(path, _n_copies(nb, a)), nbytes=nb, label="XNNPACK fp32"))
    except Exception as e:  # third-party lowering: the cell says why
        specs.append(dict(name="fp32", paths=[], nbytes=0, label="XNNPACK fp32", error=_reason(e)))
    for layout in a.layouts:
        path = os.path.join(tmp, f"8da4w-{layout}-{k}x{n}.pte")
        label, err = _et_8da4w(base, layout, x, path, ds)
        if err:
            specs.append(dict(name=f"8da4w {layout}", paths=[], nbytes=0, label="8da4w", error=err))
            continue
        nb = os.path.getsize(path)
        specs.append(dict(name=f"8da4w {layout}", paths=_file_copies(path, _n_copies(nb, a)), nbytes=nb,
                          label=label))
    return specs


def et_ours(base, shape, bits, a, tmp):
    """Specs of our programs for one bit width (every layout x acts) and the packed weights."""
    import paretoq_ao.export as pe
    k, n = shape
    x = torch.randn(2, k)
    specs, weights = [], {}
    for layout in a.layouts:
        m = _ours(base, bits, layout, a.acts[0])
        weights[layout] = m.weight
        nb = m.weight.nbytes_packed()
        for acts in a.acts:
            path = os.path.join(tmp, f"pq{bits}-{layout}-{acts}-{k}x{n}.pte")
            with _quiet():
                pe.export_executorch(m, (x,), path, dynamic_shapes=_dyn(a), activations=acts)
            specs.append(dict(name=f"ours {layout} {acts}", paths=_file_copies(path, _n_copies(nb, a)),
                              nbytes=nb, label=f"paretoq {bits}-bit {layout} {acts}", acts=acts))
    return specs, weights


def _load_specs(specs) -> List[Variant]:
    import paretoq_ao.export as pe
    out = []
    for s in specs:
        v = Variant(s["name"], nbytes=s["nbytes"], error=s.get("error"), label=s["label"])
        if v.error is None:
            try:
                v.fns = [pe.load_executorch(p) for p in s["paths"]]
            except RuntimeError as e:  # the runtime refused the program
                v.error, v.fns = f"load failed: {_reason(e)}", []
        out.append(v)
    return out


def run_et_bits(base, shape, bits, baselines, a, tmp) -> List[dict]:
    """All rows of one bit width in ExecuTorch (every thread count and M)."""
    import paretoq_ao.export as pe
    specs, weights = et_ours(base, shape, bits, a, tmp)
    rows = []
    for th in a.threads:
        gc.collect()
        pe.set_num_threads(th)  # no program is alive here: the previous ones were dropped
        variants = _load_specs(specs + baselines)
        for mm in a.m:
            x = torch.randn(mm, shape[0])
            before = {acts: pe.kernel_call_count(acts) for acts in a.acts}
            res = time_block(variants, x, a.iters)
            calls = {acts: pe.kernel_call_count(acts) - before[acts] for acts in a.acts}
            rows += _rows("et", shape, bits, mm, th, variants, res, weights, calls, a)
        del variants
        gc.collect()
    for s in specs:
        for p in s["paths"]:
            os.unlink(p)
    return rows


# ----------------------------------------------------------------------------- eager PyTorch

def _copies(m: nn.Module, n: int) -> List[nn.Module]:
    """m and n - 1 deep copies (separate storage)."""
    return [m] + [copy.deepcopy(m) for _ in range(n - 1)]


def _pt_torchao(base, name, desc, make_config, a) -> Variant:
    """A torchao eager baseline, probed once; n/a (reason) if it does not quantize or run here."""
    from torchao import quantize_
    m = copy.deepcopy(base)
    try:
        with _quiet():
            quantize_(m, make_config())
            with torch.inference_mode():
                m(torch.randn(1, base.in_features))
    except Exception as e:  # third-party quantization / kernels: any failure becomes the cell text
        return Variant(name, error=_reason(e), label=desc)
    nb = _module_nbytes(m)
    label = f"{desc} ({type(m.weight).__name__}, as torchao runs it eagerly here)"
    return Variant(name, fns=_copies(m, _n_copies(nb, a)), nbytes=nb, label=label)


def pt_baselines(base, a) -> List[Variant]:
    from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationIntxWeightConfig, PerGroup
    nb = _module_nbytes(base)
    out = [Variant("fp32", fns=_copies(copy.deepcopy(base), _n_copies(nb, a)), nbytes=nb, label="nn.Linear fp32")]
    out.append(_pt_torchao(base, "ao 8da4w", "torchao Int8DynamicActivationIntxWeightConfig(int4, PerGroup(32))",
                           lambda: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                                         weight_granularity=PerGroup(32)), a))
    out.append(_pt_torchao(base, "ao int4wo", "torchao Int4WeightOnlyConfig(group_size=32)",
                           lambda: Int4WeightOnlyConfig(group_size=32), a))
    return out


def run_pt_bits(base, shape, bits, baselines, a) -> List[dict]:
    """All rows of one bit width in eager PyTorch."""
    from paretoq_ao import set_activations
    from paretoq_ao.export import cpu_backend
    variants, weights = [], {}
    for layout in a.layouts:
        m = _ours(base, bits, layout, a.acts[0])
        weights[layout] = m.weight
        for acts in a.acts:
            mi = copy.deepcopy(m)
            set_activations(mi, acts)
            nb = mi.weight.nbytes_packed()
            variants.append(Variant(f"ours {layout} {acts}", fns=_copies(mi, _n_copies(nb, a)), nbytes=nb,
                                    label=f"paretoq {bits}-bit {layout} {acts}"))
        del m
    rows = []
    old = torch.get_num_threads()
    try:
        for th in a.threads:
            torch.set_num_threads(th)
            for mm in a.m:
                x = torch.randn(mm, shape[0])
                before = {acts: cpu_backend.call_count(acts == "int8") for acts in a.acts}
                res = time_block(variants + baselines, x, a.iters)
                calls = {acts: cpu_backend.call_count(acts == "int8") - before[acts] for acts in a.acts}
                rows += _rows("pt", shape, bits, mm, th, variants + baselines, res, weights, calls, a)
    finally:
        torch.set_num_threads(old)
    return rows


# ----------------------------------------------------------------------------- rows and tables

def _rows(rt, shape, bits, mm, th, variants, res, weights, calls, a) -> List[dict]:
    """One row per layout x acts of a timed block. ``calls``: kernel calls seen per activation mode."""
    by = {v.name: v for v in variants}
    cell = {name: (res[name] if name in res else f"n/a ({v.error or 'not timed'})") for name, v in by.items()}
    expect = {acts: sum(len(v.fns) + a.iters for n_, v in by.items()
                        if n_.startswith("ours ") and n_.endswith(" " + acts) and n_ in res) for acts in a.acts}
    x = torch.randn(mm, shape[0])
    rows = []
    for layout in a.layouts:
        for acts in a.acts:
            name = f"ours {layout} {acts}"
            v = by[name]
            base = {"fp32": "fp32", "8da4w": f"8da4w {layout}"} if rt == "et" else \
                {b: b for b in ("fp32", "ao 8da4w", "ao int4wo")}
            ours = cell[name]
            gbs = v.nbytes / (ours * 1e-3) / 1e9 if isinstance(ours, float) else None
            rows.append(dict(
                runtime=rt, k=shape[0], n=shape[1], bits=bits, layout=layout, acts=acts, m=mm, threads=th,
                ours=ours, base={col: cell.get(b, "n/a") for col, b in base.items()}, gbs=gbs,
                base_label={col: by[b].label if b in by else b for col, b in base.items()},
                copies=len(v.fns), cycled_mb=len(v.fns) * v.nbytes / (1 << 20),
                plan=_plan(x, weights[layout], acts),
                calls_ok=calls.get(acts) == expect.get(acts)))
    return rows


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="11008x4096,4096x4096", help="KxN list (K = in_features)")
    ap.add_argument("--bits", default=",".join(BITS))
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--acts", default="int8,float")
    ap.add_argument("--m", default="1,8,128")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runtimes", default="et,pt")
    ap.add_argument("--iters", type=int, default=20, help="timed calls per variant per block")
    ap.add_argument("--l3-mb", type=float, default=None, help="L3 size (default: from sysfs, else 32)")
    ap.add_argument("--max-copies", type=int, default=64, help="cap on copies per variant")
    ap.add_argument("--quick", action="store_true", help="1024x512, 2-bit, row+g64, M 1, 1 thread, few iters")
    ap.add_argument("--out", default=None, help="results file (default: results/cpu-matrix-<date>.md)")
    a = ap.parse_args(argv)
    if a.quick:
        a.shapes, a.bits, a.layouts, a.m, a.threads, a.iters = "1024x512", "2", "row,g64", "1", "1", 5
        a.max_copies = min(a.max_copies, 4)
    a.l3_mb = a.l3_mb if a.l3_mb is not None else _l3_mb_default()
    a.shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
    a.bits, a.layouts, a.acts = a.bits.split(","), a.layouts.split(","), a.acts.split(",")
    a.m, a.threads = [int(v) for v in a.m.split(",")], [int(v) for v in a.threads.split(",")]
    a.runtimes = a.runtimes.split(",")
    for name, vals, allowed in (("bits", a.bits, BITS), ("layouts", a.layouts, LAYOUTS),
                                ("acts", a.acts, ("int8", "float")), ("runtimes", a.runtimes, ("et", "pt"))):
        bad = [v for v in vals if v not in allowed]
        if bad:
            ap.error(f"--{name}: unknown {bad} (choose from {', '.join(allowed)})")
    return a


def run_shape(shape, a, log) -> List[dict]:
    base = _random_linear(*shape, seed=0)
    rows = []
    if "et" in a.runtimes:
        tmp = tempfile.mkdtemp(prefix="cpu-matrix-")
        try:
            baselines = et_baselines(base, shape, a, tmp)
            for s in baselines:
                what = f"n/a ({s['error']})" if s.get("error") else \
                    f"{s['label']}, {len(s['paths'])} copies of {s['nbytes'] / 1e6:.1f} MB"
                log(f"et {shape}: {s['name']}: {what}")
            for bits in a.bits:
                rows += _logged(run_et_bits(base, shape, bits, baselines, a, tmp), log)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if "pt" in a.runtimes:
        baselines = pt_baselines(base, a)
        for v in baselines:
            log(f"pt {shape}: {v.name}: " + (f"n/a ({v.error})" if v.error else
                                            f"{len(v.fns)} copies of {v.nbytes / 1e6:.1f} MB"))
        for bits in a.bits:
            rows += _logged(run_pt_bits(base, shape, bits, baselines, a), log)
        del baselines
        gc.collect()
    return rows


def _logged(rows, log):
    for r in rows:
        log(f"{r['runtime']} {r['k']}x{r['n']} {r['bits']}-bit {r['layout']} {r['acts']} M={r['m']} t={r['threads']}: "
            f"ours {_ms(r['ours'])} ms | " + " | ".join(f"{b} {_ms(v)}" for b, v in r["base"].items()))
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    import paretoq_ao.export as pe
    pe.load_kernels()
    date = datetime.datetime.now().isoformat(timespec="seconds")
    info = machine_info(a)
    t_start = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t_start:6.1f}s] {s}", flush=True)  # noqa: E731
    bw = dram_bandwidth(a.threads)
    log("DRAM read GB/s: " + ", ".join(f"{t} thr {v:.1f}" for t, v in bw.items()))
    rows, notes = [], []
    for shape in a.shapes:
        rows += run_shape(shape, a, log)
    seen = {}
    for r in rows:
        for b, v in r["base"].items():
            label = r["base_label"].get(b, b)
            seen.setdefault((r["runtime"], b, label), v if isinstance(v, str) else "")
    for (rt, b, label), v in seen.items():
        notes.append(f"{rt} column `{b}`: {label}" + (f" -- {v}" if v else ""))
    text = report(a, os.path.abspath(__file__), argv, info, bw, rows, notes, date)
    print(text)
    out = a.out or results_path(os.path.dirname(HERE), "cpu-matrix", date)
    write_text(out, text)
    print("written", out)
    return out


if __name__ == "__main__":
    main()
