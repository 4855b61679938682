#!/usr/bin/env python
"""Static analysis of the ``paretoq::linear`` kernels' machine code, without a GPU.

    python benchmarks/kernel_sass.py                           # default configs, M = 1 and 16, sm_90
    python benchmarks/kernel_sass.py --candidates --bits 2 --m 1   # every GEMV autotune candidate
    python benchmarks/kernel_sass.py --arch 80 --sms 108 --clock-ghz 1.41 --peak-tbps 2.04  # A100
    python benchmarks/kernel_sass.py --out benchmarks/results/kernel-sass-DATE.md

Each kernel is compiled for ``sm_<arch>`` with Triton's bundled ptxas (as
``paretoq_ao.triton_kernels.compile_check`` does) and disassembled with the bundled ``cuobjdump``.
The K loop is the largest loop of the SASS (the body of the longest backward branch). Reported per
kernel: registers and local memory (spills) from ``cuobjdump -res-usage``, the loop's instruction
count and mix, shared-memory traffic and barriers inside the loop, and

* **instructions per code**: loop instructions / weight codes a thread handles per iteration
  (``BLOCK_N * BLOCK_K / threads``; a tl.dot tile uses each code for BLOCK_M rows of x, so for
  M > 1 this is the decode cost the tensor cores cannot hide when the layer is memory bound);
* **issue bound**: the HBM bandwidth at which the SMs could issue no more of these instructions
  (``SMs x 4 schedulers x 32 lanes x clock / instructions per code`` codes per second, times
  ``b / 8`` bytes per code), as a fraction of ``--peak-tbps``. A GEMV whose bound is below the
  target (80 % of peak for 2-bit) cannot reach it whatever the memory system does; a bound above
  it is necessary, not sufficient (latency, occupancy and the real clock decide the rest).

These are static counts, not timings: only a GPU run (``benchmarks/bench_kernels.py``) measures
speed. Results are written atomically with the command, date, Triton version and commit.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import replace

from _meta import git_commit, write_text  # benchmarks/_meta.py (this folder is sys.path[0])

# H100 SXM5: 132 SMs, 1.98 GHz max boost, 3.35 TB/s HBM3.
DEFAULT_GPU = dict(sms=132, clock_ghz=1.98, peak_tbps=3.35)
ISSUE_LANES_PER_SM = 4 * 32  # four schedulers, one warp instruction (32 lanes) per clock each

_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")


def parse_sass(text: str):
    """[(address, instruction text)] of every instruction of a ``cuobjdump -sass`` listing."""
    out = []
    for line in text.splitlines():
        m = _INSTR.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def opcode(instr: str) -> str:
    """Base opcode: predicate guard and modifiers removed (``@!P0 LDG.E.64 ...`` -> ``LDG``)."""
    instr = re.sub(r"^@!?U?P[T0-9]+\s+", "", instr)
    return instr.split()[0].split(".")[0] if instr else ""


def main_loop(instrs):
    """Opcode counts of the largest loop body (between a backward branch and its target), or
    None when the code has no loop."""
    best = None
    for addr, text in instrs:
        m = _BRANCH.search(text)
        if not m or m.group(1) is None:
            continue
        target = int(m.group(1), 16)
        if target >= addr:
            continue
        body = [t for a, t in instrs if target <= a <= addr]
        if best is None or len(body) > len(best):
            best = body
    if best is None:
        return None
    return collections.Counter(opcode(t) for t in best)


def resource_usage(text: str):
    """(registers, local-memory bytes, shared bytes) of the first function of ``-res-usage``."""
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if not m:
        return None
    return int(m.group(1)), int(m.group(4)), int(m.group(3))


def _cuobjdump():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Triton's bundled cuobjdump not found at {path}")
    return path


def analyse(cfg, code_bits: int, arch: int = 90, mode: int = 0, dtype=None, gpu=None):
    """Compile ``cfg`` for ``code_bits`` on sm_<arch> and return a dict of static figures."""
    import torch

    from paretoq_ao.triton_kernels.compile_check import compile_kernel

    gpu = dict(DEFAULT_GPU, **(gpu or {}))
    dtype = dtype or torch.bfloat16
    kernel = compile_kernel(cfg, code_bits, mode, dtype, atomic=cfg.split_k > 1, aligned=True,
                            arch=arch, group_size=cfg.block_k * 2)
    tool = _cuobjdump()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    loop = main_loop(parse_sass(sass))
    regs, local, shared = resource_usage(res) or (None, None, None)
    threads = cfg.num_warps * 32
    codes = cfg.block_n * cfg.block_k / threads  # weight codes (each used by BLOCK_M rows of x)
    row = dict(kind=cfg.kind, block_n=cfg.block_n, block_k=cfg.block_k, block_m=cfg.block_m,
               num_warps=cfg.num_warps, split_k=cfg.split_k, code_bits=code_bits, scale_mode=mode,
               registers=regs, local_bytes=local, shared_bytes=shared, loop=None)
    if loop is None:
        return row
    n = sum(loop.values())
    per_code = n / codes
    codes_per_s = gpu["sms"] * ISSUE_LANES_PER_SM * gpu["clock_ghz"] * 1e9 / per_code
    bound_tbps = codes_per_s * code_bits / 8 / 1e12
    row.update(
        loop=dict(loop.most_common()), loop_instructions=n, codes_per_thread=codes,
        instr_per_code=per_code,
        shared_ops=loop.get("LDS", 0) + loop.get("STS", 0) + loop.get("STSM", 0) + loop.get("LDSM", 0),
        barriers=loop.get("BAR", 0),
        int_to_float=loop.get("I2F", 0) + loop.get("I2FP", 0),
        issue_bound_tbps=bound_tbps, issue_bound_fraction=bound_tbps / gpu["peak_tbps"],
    )
    return row


def default_jobs(bits_list, ms, candidates: bool):
    """(M, config, code_bits) triples: the untuned default configs for N = K = 8192 with per-row
    scales at each M, with rows of whole words and without (so both the word kernels and the byte
    kernels they replace appear), or every autotune candidate of M's path."""
    import torch

    from paretoq_ao.formats import get_format
    from paretoq_ao.triton_kernels import tuning
    from paretoq_ao.triton_kernels.linear import Problem

    seen = []
    for bits in bits_list:
        cb = get_format(bits).code_bits
        for M in ms:
            cfgs = []
            for aligned in (True, False):
                p = Problem(M=M, N=8192, K=8192, bits=bits, code_bits=cb, groups=1,
                            x_dtype=torch.bfloat16, out_dtype=torch.bfloat16, dot_precision=None,
                            device="sass", num_sms=DEFAULT_GPU["sms"], smem_bytes=232448,
                            word_aligned=aligned)
                if candidates:
                    cfgs += tuning.prune(tuning.candidate_configs(p), p)
                else:
                    cfgs.append(tuning.default_config(p))
            for c in cfgs:
                c = replace(c, split_k=1)  # split-K changes the grid, not the loop
                if (M, c, cb) not in seen:
                    seen.append((M, c, cb))
    return seen


def render(rows, args, meta) -> str:
    lines = [
        "# Static SASS analysis of the paretoq::linear Triton kernels",
        "",
        f"- Date: {meta['date']}; command: `{meta['command']}`",
        f"- Target: sm_{args.arch}; Triton {meta['triton']}; commit {meta['git']}; machine: "
        f"{meta['host']} (no GPU: compiled with Triton's bundled ptxas, disassembled with cuobjdump)",
        f"- Issue bound assumes {args.sms} SMs x 4 schedulers x 32 lanes at {args.clock_ghz} GHz "
        f"and {args.peak_tbps} TB/s peak HBM bandwidth.",
        "- Static instruction counts, **not timings**: the bound is a ceiling that the code cannot "
        "pass, not a prediction. For M > 1 it bounds the rate at which a tile's weights can be "
        "decoded (each code then feeds BLOCK_M rows of tensor-core math).",
        "",
        "| M | kernel | code bits | BLOCK_M x N x K | warps | regs | spill B | loop instr | "
        "codes/thread | instr/code | LDS+STS in loop | BAR in loop | I2F in loop | issue bound TB/s "
        "| of peak |",
        "|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tile = (f"{r['block_m']} x " if r["kind"] in ("gemm", "gemmw") else "") + \
            f"{r['block_n']} x {r['block_k']}"
        if r.get("loop") is None:
            lines.append(f"| {r.get('M', '')} | {r['kind']} | {r['code_bits']} | {tile} | "
                         f"{r['num_warps']} | {r['registers']} | {r['local_bytes']} | no loop found "
                         "| | | | | | | |")
            continue
        lines.append(
            f"| {r.get('M', '')} | {r['kind']} | {r['code_bits']} | {tile} | {r['num_warps']} | "
            f"{r['registers']} | {r['local_bytes']} | {r['loop_instructions']} | "
            f"{r['codes_per_thread']:.0f} | {r['instr_per_code']:.2f} | {r['shared_ops']} | "
            f"{r['barriers']} | {r['int_to_float']} | {r['issue_bound_tbps']:.2f} | "
            f"{100 * r['issue_bound_fraction']:.0f} % |")
    lines += ["", "Loop instruction mix (opcode: count):", ""]
    for r in rows:
        if r.get("loop"):
            mix = ", ".join(f"{k} {v}" for k, v in r["loop"].items())
            lines.append(f"- M={r.get('M', '')} {r['kind']} b={r['code_bits']} "
                         f"{r['block_m']}x{r['block_n']}x{r['block_k']} w{r['num_warps']}: {mix}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Static SASS analysis of the GEMV kernels (no GPU)")
    ap.add_argument("--bits", default="1,2,3,4", help="comma list of bit widths of the rowbits kernels (ternary has its own kernel, trits5.py)")
    ap.add_argument("--m", default="1,16", help="comma list of activation rows M (1: the GEMV "
                    "path, 2-64: small-M tl.dot, > 64: large-M tl.dot)")
    ap.add_argument("--candidates", action="store_true",
                    help="every autotune candidate kept by the pruner, not only the default")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--sms", type=int, default=DEFAULT_GPU["sms"])
    ap.add_argument("--clock-ghz", type=float, default=DEFAULT_GPU["clock_ghz"])
    ap.add_argument("--peak-tbps", type=float, default=DEFAULT_GPU["peak_tbps"])
    ap.add_argument("--out", help="write the Markdown report here (atomically)")
    args = ap.parse_args(argv)
    from paretoq_ao.ops import triton_interpreting

    if triton_interpreting():
        print("kernel_sass: unset TRITON_INTERPRET (the kernels must be compiled)", file=sys.stderr)
        return 2
    from paretoq_ao.triton_kernels.compile_check import toolchain_problem

    problem = toolchain_problem(args.arch)
    if problem:
        print(f"kernel_sass: SKIP: {problem}", file=sys.stderr)
        return 3
    try:
        bits_list = [float(b) if "." in b else int(b) for b in args.bits.split(",") if b]
    except ValueError:
        ap.error(f"--bits must be a comma list of numbers, got {args.bits!r}")
    gpu = dict(sms=args.sms, clock_ghz=args.clock_ghz, peak_tbps=args.peak_tbps)
    try:
        ms = [int(m) for m in args.m.split(",") if m]
    except ValueError:
        ap.error(f"--m must be a comma list of integers, got {args.m!r}")
    if not ms or min(ms) < 1:
        ap.error(f"--m needs positive row counts, got {args.m!r}")
    rows = []
    for M, cfg, cb in default_jobs(bits_list, ms, args.candidates):
        rows.append(dict(analyse(cfg, cb, arch=args.arch, gpu=gpu), M=M))
    import platform

    import triton

    meta = dict(date=_dt.date.today().isoformat(), triton=triton.__version__, git=git_commit(),
                host=platform.node(), command=" ".join(shlex.quote(a) for a in sys.argv))
    text = render(rows, args, meta)
    print(text)
    if args.out:
        write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
