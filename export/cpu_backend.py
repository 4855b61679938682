"""The ``cpu`` backend of the ParetoQ linear ops (registered through the ``paretoq_ao.backends``
entry point; see paretoq_ao/backends.py): the C++ kernel library of ``csrc/`` through its ATen
registration ``paretoq_cpu::linear``, for eager PyTorch and ``torch.compile`` on CPUs.

The library is built on first use against the installed torch (a few minutes on two cores, once; cached,
see ``_build.py``) and loaded once per process. It serves every format, scale layout and batch
size, both activation modes, any floating input dtype except float64 (computed in float32).
``torch.compile`` graphs of inference calls call ``paretoq_cpu::linear`` itself (its fake
implementation is registered here when the library loads), not the Python body of the
``paretoq::`` ops.
If it cannot be built (no compiler, no CMake), the first CPU call warns once, naming what is
missing, and the ops run the PyTorch reference. ``PARETOQ_CPU_KERNELS=0`` turns it off quietly.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Optional

import torch

from paretoq_ao import backends

from ._build import KernelBuildError, build_dir, load_aten_kernels

__all__ = ["activate", "BACKEND", "available", "call_count", "last_row_chunks", "parallel_backend", "plan",
           "read_bandwidth"]

_log = logging.getLogger("paretoq_ao")
_lock = threading.Lock()
_status: Optional[str] = None  # "ok" or the reason the kernels are unavailable
_DISABLED = "disabled by PARETOQ_CPU_KERNELS=0"


def _load() -> Optional[str]:
    """None once the library is loaded, else why it is not (computed once)."""
    global _status
    if _status is None:
        with _lock:
            if _status is None:
                if os.environ.get("PARETOQ_CPU_KERNELS", "").strip() == "0":
                    _status = _DISABLED
                else:
                    _status = _build_and_load()
    return None if _status == "ok" else _status


def _build_and_load() -> str:
    try:
        target = build_dir("aten")
        if not target.exists():
            _log.warning("paretoq_ao: building the C++ CPU kernels against torch %s into %s "
                         "(once; a few minutes)", torch.__version__, target)
        load_aten_kernels()
        _register_fake()
        if torch.ops.paretoq_cpu.parallel_backend() != "openmp":
            _log.warning("paretoq_ao: the C++ CPU kernels in %s were built without OpenMP, so they run on "
                         "one thread whatever torch.set_num_threads says (install a compiler with OpenMP, "
                         "e.g. g++ with libgomp, and delete that folder to rebuild)", target)
    except KernelBuildError as e:
        first = str(e).strip().splitlines()[0]
        return (f"the C++ CPU kernels are unavailable: {first} (fix that, or set PARETOQ_CPU_KERNELS=0 "
                f"to use the reference without this warning)")
    return "ok"


def _register_fake() -> None:
    # The shapes paretoq_cpu::linear returns, for torch.compile's tracing (the C++ library defines
    # no Meta kernel); arguments were validated by ops.check_linear_args before a graph names it.
    @torch.library.register_fake("paretoq_cpu::linear")
    def _(input, packed, scale, bits, int8_act):
        return input.new_empty((*input.shape[:-1], packed.shape[0]))


def available() -> bool:
    """True when the C++ CPU kernels are built and loaded (builds them on first call)."""
    return _load() is None


def _supports(call: backends.LinearCall) -> Optional[str]:
    if call.input.dtype == torch.float64 or call.scale.dtype == torch.float64:
        return "float64 tensors (the C++ kernels compute in float32)"
    return _load()


def _run(call: backends.LinearCall) -> torch.Tensor:
    return torch.ops.paretoq_cpu.linear(call.input, call.packed, call.scale, float(call.fmt.bits), call.int8_act)


BACKEND = backends.LinearBackend(
    name="cpu", device_types=("cpu",), priority=10, supports=_supports, run=_run,
    quiet=lambda reason: reason == _DISABLED, graph_op=_run, ready=lambda: _load() is None,
)


def activate() -> None:
    backends.register_backend(BACKEND)


def call_count(int8_act: bool = False) -> int:
    """Calls the C++ CPU kernels served since they were loaded (0 if they are not), per mode."""
    if _status != "ok":
        return 0
    return int(torch.ops.paretoq_cpu.call_count(bool(int8_act)))


def parallel_backend() -> str:
    """How the C++ CPU kernels split rows over threads: "openmp" (torch's intra-op pool, i.e.
    ``torch.set_num_threads``) or "serial" (built without OpenMP)."""
    if not available():
        raise RuntimeError(_status)
    return str(torch.ops.paretoq_cpu.parallel_backend())


def last_row_chunks() -> int:
    """Into how many ranges the last C++ linear call split its output rows (1 = one thread)."""
    if not available():
        raise RuntimeError(_status)
    return int(torch.ops.paretoq_cpu.last_row_chunks())


def plan(input: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits, int8_act: bool = False) -> str:
    """Which kernel path the C++ library runs for these arguments, e.g. "avx512 int8, 16 rows per
    vector", or "scalar (...)" with the reason a layout cannot use the SIMD code."""
    if not available():
        raise RuntimeError(_status)
    return str(torch.ops.paretoq_cpu.plan(input, packed, scale, float(bits), bool(int8_act)))


def read_bandwidth(threads: Optional[int] = None, gib: float = 1.0, reps: int = 5) -> float:
    """This machine's DRAM read bandwidth in GB/s: the best of ``reps`` streaming reads of a
    ``gib`` GiB buffer (far larger than any cache), each by the kernel library's read loop and by
    ``torch.sum`` (whichever streams faster on this CPU), split over ``threads`` intra-op threads
    (default: torch's current setting). The physical limit the CPU
    benchmarks compare the kernels with."""
    import time

    if not available():
        raise RuntimeError(_status)
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        buf = torch.ones(int(gib * (1 << 30)) // 8, dtype=torch.int64)
        best = 0.0
        for _ in range(reps):  # the best of two streaming reads: ours and torch's own vectorised sum
            for read in (torch.ops.paretoq_cpu.stream_read, torch.sum):
                t0 = time.perf_counter()
                read(buf)
                best = max(best, buf.numel() * 8 / (time.perf_counter() - t0) / 1e9)
        return best
    finally:
        torch.set_num_threads(old)
