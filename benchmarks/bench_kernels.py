#!/usr/bin/env python
"""Kernel benchmark: ParetoQ Triton linear vs bf16 cuBLAS vs torchao int4 weight-only.

    python benchmarks/bench_kernels.py                 # full grid (H100: tens of minutes, autotuning)
    python benchmarks/bench_kernels.py --quick         # 4096x4096, M in {1, 16}, 2 and 4 bits
    python benchmarks/bench_kernels.py --group-size 128 --timer eager --peak-tbps 2.0

For every N x K in {4096x4096, 4096x14336, 14336x4096, 8192x8192, 28672x8192} and M in
{1, 4, 16, 64, 256}: ``paretoq_ao.triton_kernels.triton_linear`` at each bit width (1, 1.58, 2, 3,
4), ``torch.nn.functional.linear`` in bf16 (cuBLAS) and torchao's int4 weight-only linear
(``quantize_(lin, Int4WeightOnlyConfig(group_size=128))``; the default "plain" packing needs the
mslk/fbgemm kernels, so the tinygemm "tile_packed_to_4d" packing is measured as well when it works).

Timing (``--timer``):
* ``graph`` (default): each measurement replays a CUDA graph that calls the kernel on R rotated
  copies of the weights (and activations), R chosen so that the rotated set is >= 2x the L2 size:
  every weight comes from HBM, as in decoding, and no Python/launch overhead is counted.
* ``eager``: ``triton.testing.do_bench`` (flushes L2 before every repetition; includes the host
  launch overhead of each call, which dominates small GEMVs).

Reported per entry: median time, speedup vs bf16, achieved GB/s (weights + scales + activations +
output bytes / time) and its fraction of the peak HBM bandwidth (``--peak-tbps``, default 3.35 for
an H100 SXM), TFLOP/s, the config the autotuner chose, and a correctness check against
``paretoq_ao.ops.reference_linear``. Results go to ``benchmarks/results/`` as Markdown + JSON named
with the device and date; the command line is recorded in both.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from types import SimpleNamespace
from typing import Optional

from _meta import git_commit, write_text  # benchmarks/_meta.py (this folder is sys.path[0])

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (28672, 8192)]
MS = [1, 4, 16, 64, 256]
BITS = [1, 1.58, 2, 3, 4]
HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="ParetoQ Triton kernels vs bf16 cuBLAS vs torchao int4")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES),
                    help="comma-separated NxK list (N = out_features, K = in_features)")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated M (tokens)")
    ap.add_argument("--bits", default=",".join(map(str, BITS)), help="ParetoQ bit widths")
    ap.add_argument("--group-size", default="row",
                    help="ParetoQ scale granularity: 'row' (one scale per output row) or an int")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--peak-tbps", type=float, default=3.35,
                    help="peak HBM bandwidth in TB/s (H100 SXM 3.35, H100 PCIe 2.0, H200 4.8)")
    ap.add_argument("--timer", choices=["graph", "eager"], default="graph")
    ap.add_argument("--rep-ms", type=float, default=100.0, help="time budget per measurement")
    ap.add_argument("--no-int4", action="store_true", help="skip the torchao int4 baseline")
    ap.add_argument("--no-autotune", action="store_true",
                    help="use the kernels' default configs (PARETOQ_TRITON_AUTOTUNE=0)")
    ap.add_argument("--quick", action="store_true", help="4096x4096, M in {1, 16}, bits 2 and 4")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--save-configs", metavar="PATH",
                    help="also write the tuned kernel configs of this run (JSON, "
                         "paretoq_ao.triton_kernels.save_configs) -- e.g. "
                         "triton_kernels/configs/<gpu>.json to ship them")
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.ms, args.bits = "4096x4096", "1,16", "2,4"
    args.shape_list = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    args.m_list = [int(m) for m in args.ms.split(",")]
    args.bits_list = [float(b) if "." in b else int(b) for b in args.bits.split(",")]
    args.gs = None if args.group_size == "row" else int(args.group_size)
    return args


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _l2_bytes(torch):
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20)


def rotations(torch, bytes_per_copy: int, cap: int = 64) -> int:
    """Copies needed so that cycling through them never finds a weight in L2."""
    return max(2, min(cap, math.ceil(2 * _l2_bytes(torch) / max(1, bytes_per_copy))))


def time_graph(torch, fns, rep_ms: float) -> float:
    """Median ms per call of ``fns`` (one callable per rotated copy), replayed in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 3, 1e-3)
    n_rep = max(5, min(200, int(rep_ms / est)))
    times = []
    for _ in range(n_rep):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    del graph
    times.sort()
    return times[len(times) // 2]


def time_eager(fn, rep_ms: float) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=max(5, int(rep_ms / 4)), rep=int(rep_ms), return_mode="median"))


def measure(torch, args, make_fns, bytes_per_copy: int):
    """(ms, note). ``make_fns(r)`` returns r callables over r rotated copies."""
    if args.timer == "graph":
        r = rotations(torch, bytes_per_copy)
        try:
            return time_graph(torch, make_fns(r), args.rep_ms), f"graph x{r}"
        except Exception as e:  # noqa: BLE001 - report and fall back to eager timing
            torch.cuda.synchronize()
            note = f"graph failed ({type(e).__name__}); eager"
            return time_eager(make_fns(1)[0], args.rep_ms), note
    return time_eager(make_fns(1)[0], args.rep_ms), "eager (L2 flushed)"


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _nbytes(t):
    return t.numel() * t.element_size()


def _int4_modules(torch, nn, K, N, dtype, w, fmt_name, count):
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    cfg = (Int4WeightOnlyConfig(group_size=128) if fmt_name == "plain"
           else Int4WeightOnlyConfig(group_size=128, int4_packing_format=fmt_name))
    mods = []
    for _ in range(count):
        lin = nn.Linear(K, N, bias=False, dtype=dtype, device="cuda")
        with torch.no_grad():
            lin.weight.copy_(w)
        quantize_(lin, cfg)
        mods.append(lin)
    return mods


def _module_weight_bytes(mod):
    w = mod.weight
    try:
        names, _ = w.__tensor_flatten__()
        return sum(_nbytes(getattr(w, n)) for n in names if getattr(w, n, None) is not None)
    except Exception:  # noqa: BLE001
        return w.numel() // 2


def _kernel_api():
    """The ParetoQ functions under test, imported once PARETOQ_TRITON_AUTOTUNE has been set."""
    import paretoq_ao as pq
    from paretoq_ao.ops import reference_linear
    from paretoq_ao.triton_kernels import triton_linear, tuned_configs
    from paretoq_ao.triton_kernels.tuning import tuning_key
    from paretoq_ao.triton_kernels.linear import _prepare

    return SimpleNamespace(pq=pq, reference_linear=reference_linear, triton_linear=triton_linear,
                           tuned_configs=tuned_configs, tuning_key=tuning_key, prepare=_prepare)


class _Bench:
    """State shared by the per-shape / per-M helpers of ``main``: the settings, the modules in use
    (torch, torch.nn, torch.nn.functional, ``_kernel_api()``), and the results collected so far."""

    def __init__(self, args, torch, nn, F, api):
        self.args, self.torch, self.nn, self.F, self.api = args, torch, nn, F, api
        self.dtype = getattr(torch, args.dtype)
        self.peak = args.peak_tbps * 1e12
        self.rows = []
        self.int4_status = {}

    def record(self, **kw):
        self.rows.append(kw)
        t = kw["ms"]
        print(f"{kw['N']:>6}x{kw['K']:<6} M={kw['M']:<4} {kw['kernel']:<18} "
              f"{t * 1e3:9.1f} us  x{kw.get('speedup') or float('nan'):5.2f}  "
              f"{kw['gbps']:7.0f} GB/s ({kw['peak_frac'] * 100:4.1f}%)  {kw.get('config') or ''}",
              file=sys.stderr, flush=True)


class _Problem:
    """One (N, K, M) point: the activations ``x`` and what every entry's GB/s and TFLOP/s count."""

    def __init__(self, bench: _Bench, N, K, M, w16, x):
        self.N, self.K, self.M, self.w16, self.x = N, K, M, w16, x
        self.peak = bench.peak
        self.io_bytes = _nbytes(x) + M * N * bench.torch.empty((), dtype=bench.dtype).element_size()
        self.flops = 2.0 * M * N * K

    def entry(self, kernel, ms, wbytes, **extra):
        gbps = (wbytes + self.io_bytes) / (ms * 1e-3) / 1e9
        return dict(N=self.N, K=self.K, M=self.M, kernel=kernel, ms=ms, bytes=wbytes + self.io_bytes,
                    gbps=gbps, peak_frac=gbps * 1e9 / self.peak,
                    tflops=self.flops / (ms * 1e-3) / 1e12, **extra)

    def xs(self, r):
        """The activations and r - 1 copies of them (one per rotated weight copy)."""
        return [self.x] + [self.x.clone() for _ in range(r - 1)]


def _check_environment(torch, args) -> Optional[int]:
    """Exit status 2 (with a message) when compiled kernels cannot be benchmarked here, else None."""
    if not torch.cuda.is_available():
        print("bench_kernels.py: no CUDA device is available (torch.cuda.is_available() is False); "
              "this benchmark needs an NVIDIA GPU (it was written for an H100). Nothing was run.",
              file=sys.stderr)
        return 2
    from paretoq_ao.ops import triton_interpreting

    if triton_interpreting():
        print("bench_kernels.py: unset TRITON_INTERPRET to benchmark compiled kernels", file=sys.stderr)
        return 2
    if args.no_autotune:
        os.environ["PARETOQ_TRITON_AUTOTUNE"] = "0"
    return None


def _run_meta(torch, triton, args):
    """The run's metadata (command line, device, versions) for the JSON and Markdown outputs."""
    dev = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(dev)
    meta = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": props.name, "capability": f"{props.major}.{props.minor}",
        "sms": props.multi_processor_count, "l2_bytes": _l2_bytes(torch),
        "peak_tbps": args.peak_tbps, "timer": args.timer, "dtype": args.dtype,
        "group_size": args.group_size, "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "git": git_commit(), "host": platform.node(),
        "autotune": not args.no_autotune,
    }
    try:
        import torchao

        meta["torchao"] = torchao.__version__
    except Exception as e:  # noqa: BLE001
        meta["torchao"] = f"unavailable ({type(e).__name__})"
    return meta


def _paretoq_weights(b: _Bench, w):
    """bits -> (packed codes, scale) of ``w``, RTN with the paper's initial scale."""
    pq, args = b.api.pq, b.args
    packed_w = {}
    for bits in args.bits_list:
        scale = pq.init_scale(w, bits, args.gs)
        packed = pq.pack_codes(pq.quantize_codes(w, scale, bits), bits)
        packed_w[bits] = (packed, scale.to(b.dtype).contiguous())
    return packed_w


def _int4_baselines(b: _Bench, N, K, w16):
    """packing format -> torchao int4 module for the formats that run here (status in b.int4_status)."""
    torch = b.torch
    int4_mods = {}
    for fmt_name in ("plain", "tile_packed_to_4d"):
        try:
            m = _int4_modules(torch, b.nn, K, N, b.dtype, w16, fmt_name, 1)[0]
            m(torch.randn(1, K, device="cuda", dtype=b.dtype))
            torch.cuda.synchronize()
            int4_mods[fmt_name] = m
            b.int4_status[fmt_name] = "ok"
        except Exception as e:  # noqa: BLE001
            b.int4_status[fmt_name] = f"unavailable: {type(e).__name__}: {str(e)[:160]}"
    return int4_mods


def _bench_bf16(b: _Bench, pb: _Problem) -> float:
    """Time ``F.linear`` (cuBLAS) in the activation dtype; records the row and returns its ms."""
    w16, F = pb.w16, b.F
    wb = _nbytes(w16)

    def mk_bf16(r):
        ws = [w16] + [w16.clone() for _ in range(r - 1)]
        xs = pb.xs(r)
        return [(lambda a=a, w=w: F.linear(a, w)) for a, w in zip(xs, ws)]

    t_bf16, note = measure(b.torch, b.args, mk_bf16, wb)
    base = pb.entry(f"{b.args.dtype} cuBLAS", t_bf16, wb, speedup=1.0, note=note)
    b.record(**base)
    return t_bf16


def _bench_int4(b: _Bench, pb: _Problem, int4_mods, t_bf16) -> None:
    """Time each working torchao int4 packing; a failure is noted in b.int4_status."""
    torch, N, K, M = b.torch, pb.N, pb.K, pb.M
    for fmt_name, mod in int4_mods.items():
        wb4 = _module_weight_bytes(mod)

        def mk_int4(r, fmt_name=fmt_name, mod=mod):
            mods = [mod] + (_int4_modules(torch, b.nn, K, N, b.dtype, pb.w16, fmt_name, r - 1)
                            if r > 1 else [])
            xs = pb.xs(r)
            return [(lambda a=a, m=m: m(a)) for a, m in zip(xs, mods)]

        try:
            t4, note = measure(torch, b.args, mk_int4, wb4)
            b.record(**pb.entry(f"torchao int4 {fmt_name}", t4, wb4, speedup=t_bf16 / t4,
                                note=note))
        except Exception as e:  # noqa: BLE001
            b.int4_status[fmt_name] = f"failed at M={M}: {type(e).__name__}: {str(e)[:160]}"


def _config_str(cfg):
    if cfg is None:
        return None
    return (f"{cfg.kind} BM{cfg.block_m} BN{cfg.block_n} BK{cfg.block_k} "
            f"SK{cfg.split_k} w{cfg.num_warps} s{cfg.num_stages}")


def _bench_paretoq(b: _Bench, pb: _Problem, packed_w, t_bf16) -> None:
    """Time the ParetoQ Triton kernel at every bit width, with its tuned config and max relative error."""
    torch, api, x = b.torch, b.api, pb.x
    triton_linear = api.triton_linear
    for bits in b.args.bits_list:
        packed, scale = packed_w[bits]
        t0 = time.time()
        y = triton_linear(x, packed, scale, bits)  # tunes (cached per key) and compiles
        torch.cuda.synchronize()
        tune_s = time.time() - t0
        ref = api.reference_linear(x, packed, scale, bits)
        err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()
        problem = api.prepare(x, packed, scale, bits, None)[0]
        cfg = api.tuned_configs().get(api.tuning_key(problem))
        wbq = _nbytes(packed) + _nbytes(scale)

        def mk_pq(r, packed=packed, scale=scale, bits=bits):
            ps = [(packed, scale)] + [(packed.clone(), scale.clone()) for _ in range(r - 1)]
            xs = pb.xs(r)
            return [(lambda a=a, p=p, s=s: triton_linear(a, p, s, bits))
                    for a, (p, s) in zip(xs, ps)]

        tq, note = measure(torch, b.args, mk_pq, wbq)
        cfg_s = _config_str(cfg)
        b.record(**pb.entry(f"paretoq {bits}-bit", tq, wbq, speedup=t_bf16 / tq, note=note,
                            config=cfg_s, max_rel_err=err, first_call_s=round(tune_s, 2)))


def _bench_shape(b: _Bench, N, K) -> None:
    """Every kernel at every M for one N x K weight."""
    torch = b.torch
    w = (torch.randn(N, K, device="cuda", dtype=torch.float32) * 0.02)
    w16 = w.to(b.dtype)
    packed_w = _paretoq_weights(b, w)  # ParetoQ weights, one per bit width
    int4_mods = {}
    if not b.args.no_int4:
        int4_mods = _int4_baselines(b, N, K, w16)
    for M in b.args.m_list:
        x = torch.randn(M, K, device="cuda", dtype=b.dtype)
        pb = _Problem(b, N, K, M, w16, x)
        t_bf16 = _bench_bf16(b, pb)
        _bench_int4(b, pb, int4_mods, t_bf16)
        _bench_paretoq(b, pb, packed_w, t_bf16)


def _save_tuned_configs(torch, path) -> None:
    from paretoq_ao.triton_kernels import save_configs

    n = save_configs(path, device=torch.cuda.get_device_properties(0).name)
    print(f"bench_kernels.py: {n} tuned configs written to {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    rc = _check_environment(torch, args)
    if rc is not None:
        return rc

    import torch.nn.functional as F
    import triton
    from torch import nn

    bench = _Bench(args, torch, nn, F, _kernel_api())
    torch.set_grad_enabled(False)  # inference only (also keeps autograd out of graph capture)
    torch.manual_seed(0)
    meta = _run_meta(torch, triton, args)
    print(f"# {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  timer={args.timer}",
          file=sys.stderr)
    for N, K in args.shape_list:
        _bench_shape(bench, N, K)
        torch.cuda.empty_cache()

    meta["int4"] = bench.int4_status
    write_results(args, meta, bench.rows)
    if args.save_configs:
        _save_tuned_configs(torch, args.save_configs)
    return 0


def write_results(args, meta, rows):
    os.makedirs(args.out_dir, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(args.out_dir, f"bench_kernels_{slug}_{stamp}")
    write_text(base + ".json", json.dumps({"meta": meta, "results": rows}, indent=1))

    lines = [
        f"# ParetoQ Triton kernels vs bf16 cuBLAS vs torchao int4 — {meta['device']}",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; git {meta['git']}; torch {meta['torch']}, triton {meta['triton']}, "
        f"CUDA {meta['cuda']}, torchao {meta['torchao']}",
        f"- device: {meta['device']} (sm_{meta['capability'].replace('.', '')}, {meta['sms']} SMs, "
        f"L2 {meta['l2_bytes'] / 2**20:.0f} MiB); peak HBM bandwidth assumed {meta['peak_tbps']} TB/s",
        f"- timer: {meta['timer']} ({'CUDA graph over rotated weight copies, cold L2' if meta['timer'] == 'graph' else 'triton do_bench, L2 flushed, includes launch overhead'}); "
        f"activations {meta['dtype']}; ParetoQ scales: {meta['group_size']}; autotune: {meta['autotune']}",
        f"- torchao int4 (group 128): {meta.get('int4')}",
        "- GB/s counts weights + scales + activations + output once; % peak = GB/s / peak.",
        "",
    ]
    # Summary: speedup over bf16 per shape, M and kernel
    kernels = []
    for r in rows:
        if r["kernel"] not in kernels:
            kernels.append(r["kernel"])
    lines += ["## Speedup over bf16 (time bf16 / time kernel)", "",
              "| N x K | M | " + " | ".join(kernels) + " |",
              "|---|---|" + "---|" * len(kernels)]
    keys = []
    for r in rows:
        if (r["N"], r["K"], r["M"]) not in keys:
            keys.append((r["N"], r["K"], r["M"]))
    by = {(r["N"], r["K"], r["M"], r["kernel"]): r for r in rows}
    for n, k, m in keys:
        cells = []
        for kern in kernels:
            r = by.get((n, k, m, kern))
            cells.append("" if r is None else f"{r['speedup']:.2f}")
        lines.append(f"| {n}x{k} | {m} | " + " | ".join(cells) + " |")
    lines += ["", "## All measurements", "",
              "| N x K | M | kernel | time (us) | speedup vs bf16 | GB/s | % peak BW | TFLOP/s | "
              "max rel err | config | timing |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = r.get("max_rel_err")
        lines.append(
            f"| {r['N']}x{r['K']} | {r['M']} | {r['kernel']} | {r['ms'] * 1e3:.1f} | "
            f"{r['speedup']:.2f} | {r['gbps']:.0f} | {r['peak_frac'] * 100:.1f} | "
            f"{r['tflops']:.1f} | {'' if err is None else f'{err:.1e}'} | {r.get('config') or ''} | "
            f"{r.get('note') or ''} |")
    write_text(base + ".md", "\n".join(lines) + "\n")
    print(f"wrote {base}.md and {base}.json", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
