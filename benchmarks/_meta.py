"""Small helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, which
puts this folder on ``sys.path``)."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from typing import Dict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def git_commit():
    """Short hash of the checkout's HEAD, or None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def dram_bandwidth(threads, gib: float = 1.0) -> Dict[int, float]:
    """{threads: GB/s}: this machine's DRAM read bandwidth per thread count, measured by the kernel
    library's own streaming read or torch.sum, whichever is faster (``cpu_backend.read_bandwidth``, best of 5 reads
    of a ``gib`` GiB buffer) -- the physical limit every CPU benchmark quotes its kernels against.
    Where the kernels cannot be built, a streaming ``sum()`` of an int64 tensor stands in."""
    from paretoq_ao.export import cpu_backend

    if cpu_backend.available():
        return {t: cpu_backend.read_bandwidth(t, gib=gib) for t in threads}
    buf = torch.ones(int(gib * (1 << 30)) // 8, dtype=torch.int64)
    old, out = torch.get_num_threads(), {}
    try:
        for t in threads:
            torch.set_num_threads(t)
            best = math.inf
            for _ in range(5):
                t0 = time.perf_counter()
                buf.sum()
                best = min(best, time.perf_counter() - t0)
            out[t] = buf.numel() * 8 / best / 1e9
    finally:
        torch.set_num_threads(old)
    return out


def write_text(path, text: str) -> None:
    """Write a results file atomically (``paretoq_ao.atomic_write``: normal permissions, the old
    file intact on error), creating its folder."""
    from paretoq_ao import atomic_write

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def results_path(root: str, stem: str, date: str) -> str:
    """The default results file ``<root>/benchmarks/results/<stem>-<date>.md``; a file of that name
    from an earlier run the same day is kept: the new one gets ``-2``, ``-3``, ..."""
    base = os.path.join(root, "benchmarks", "results", f"{stem}-{date[:10]}")
    path, n = base + ".md", 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}.md"
    return path
