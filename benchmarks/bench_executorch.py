"""One linear inside the ExecuTorch runtime: ParetoQ 2-bit / ternary / 4-bit (our C++ kernels,
int8 activations) vs XNNPACK fp32 and torchao 8da4w (group 32) lowered to XNNPACK.

    python benchmarks/bench_executorch.py [--shapes 4096x4096,11008x4096] [--m 1,8] [--threads 1,2]

Times are medians of method.execute in executorch.runtime; results (machine, command, date) are
written to benchmarks/results/executorch-<date>.md and printed. Ratios: time / ParetoQ 2-bit.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn


def _export_plain(model, x, path):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    ds = ({0: torch.export.Dim("m", min=1, max=64)},)
    ep = torch.export.export(model.eval(), (x,), dynamic_shapes=ds, strict=False)
    prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    with open(path, "wb") as f:
        f.write(prog.buffer)


def _time(fn, x, iters, warmup=3):
    for _ in range(warmup):
        fn(x)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096,11008x4096", help="KxN list")
    ap.add_argument("--m", default="1,8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--variants", default="pq2,pq1.58,pq4,xnn_fp32,xnn_8da4w")
    ap.add_argument("--out", default=None, help="results file (default: results/executorch-<date>.md)")
    a = ap.parse_args(argv)
    from torchao import quantize_
    from paretoq_ao import ParetoQWeightOnlyConfig
    import paretoq_ao.export as pe
    pe.load_kernels()
    tmp = tempfile.mkdtemp()
    rows = []
    for shape in a.shapes.split(","):
        k, n = map(int, shape.split("x"))
        torch.manual_seed(0)
        base = nn.Linear(k, n, bias=False)
        progs = {}
        for v in a.variants.split(","):
            path = os.path.join(tmp, f"{v}-{k}x{n}.pte")
            x = torch.randn(2, k)  # batch 2: a dynamic dim must not be specialised to 1
            m = nn.Linear(k, n, bias=False)
            m.load_state_dict(base.state_dict())
            if v.startswith("pq"):
                quantize_(m, ParetoQWeightOnlyConfig(bits=float(v[2:]) if v[2:] == "1.58" else int(v[2:])),
                          filter_fn=lambda mod, fqn: True)
                pe.export_executorch(m, (x,), path, dynamic_shapes=({0: torch.export.Dim("m", min=1, max=64)},))
            elif v == "xnn_fp32":
                _export_plain(m, x, path)
            elif v == "xnn_8da4w":
                from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup
                quantize_(m, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                                   weight_granularity=PerGroup(32)))
                _export_plain(m, x, path)
            progs[v] = path
            del m
        for mm in map(int, a.m.split(",")):
            for th in map(int, a.threads.split(",")):
                pe.set_num_threads(th)
                res = {}
                for v, path in progs.items():
                    fn = pe.load_executorch(path)
                    x = torch.randn(mm, k)
                    try:
                        res[v] = _time(fn, x, a.iters)
                    except Exception as e:
                        print(f"{v} failed: {e}", file=sys.stderr)
                        res[v] = float("nan")
                    del fn
                rows.append((k, n, mm, th, res))
                print(k, n, mm, th, {v: round(t, 3) for v, t in res.items()}, flush=True)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    variants = a.variants.split(",")
    lines = [f"# ExecuTorch linear benchmark ({date})", "",
             f"Machine: {cpu}, {os.cpu_count()} cores, {platform.platform()}; kernel path {pe.kernel_path()}",
             f"Command: {' '.join([sys.executable] + sys.argv)}", "",
             "Median ms per call inside executorch.runtime (ratio = time / ParetoQ 2-bit).", "",
             "| K | N | M | threads | " + " | ".join(variants) + " |",
             "|---|---|---|---|" + "---|" * len(variants)]
    for k, n, mm, th, res in rows:
        r2 = res.get("pq2")
        cells = [f"{res[v]:.3f} ({res[v] / r2:.2f}x)" if r2 and res[v] == res[v] else f"{res[v]:.3f}" for v in variants]
        lines.append(f"| {k} | {n} | {mm} | {th} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    from paretoq_ao import atomic_write
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"executorch-{date[:10]}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(out, write)
    print("written", out)


if __name__ == "__main__":
    main()
