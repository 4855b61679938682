"""Build and load the C++ kernel library (export/csrc) with CMake, once per process.

One kernel library, two thin registrations, each built on first use:

* ``"executorch"``: ``libparetoq_et_kernels.so`` registers ``paretoq::linear.out`` and
  ``paretoq::linear_8da.out`` with the ExecuTorch runtime (``load_kernels()``); this build also
  makes the C++ unit-test binary and the kernel microbenchmark ``paretoq_kernel_bench``;
* ``"aten"``: ``libparetoq_aten_kernels.so`` registers ``paretoq_cpu::linear`` with PyTorch's
  dispatcher, built against the installed torch (``load_aten_kernels()``); paretoq_ao's CPU
  backend of ``paretoq::linear`` calls it.

Each is built into ``$PARETOQ_AO_CACHE`` or ``~/.cache/paretoq_ao/`` under a directory named after
a hash of the sources, the runtime's version and the machine, so an edit to a source or a new
ExecuTorch / torch triggers a rebuild and old builds are never reused. Builds are serialized with
a file lock and published atomically (built in a temporary directory, renamed).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

__all__ = ["KernelBuildError", "load_kernels", "load_aten_kernels", "build_kernels", "kernels_loaded",
           "source_dir", "kernel_library_handle", "LIB_NAME", "ATEN_LIB_NAME", "TEST_BINARY", "BENCH_BINARY"]

LIB_NAME = "libparetoq_et_kernels.so"
ATEN_LIB_NAME = "libparetoq_aten_kernels.so"
TEST_BINARY = "paretoq_kernel_tests"
BENCH_BINARY = "paretoq_kernel_bench"

_lock = threading.Lock()
_loaded_path: Optional[str] = None
_aten_path: Optional[str] = None
_handle: Optional[ctypes.CDLL] = None


class KernelBuildError(RuntimeError):
    """The C++ kernel library could not be built or loaded."""


def source_dir() -> Path:
    return Path(__file__).resolve().parent


def _sources():
    root = source_dir()
    files = [root / "CMakeLists.txt"] + sorted(p for p in (root / "csrc").rglob("*") if p.is_file())
    return root, files


def _executorch_dir():
    try:
        import executorch
    except ImportError as e:  # pragma: no cover - executorch is a dependency
        raise KernelBuildError("the executorch package is not installed (pip install executorch)") from e
    pkg = Path(list(executorch.__path__)[0])
    try:
        from importlib.metadata import version
        ver = version("executorch")
    except Exception:  # pragma: no cover
        ver = "unknown"
    return pkg, ver


def _find_cmake() -> str:
    exe = shutil.which("cmake")
    if exe is None:
        try:  # pip's cmake wheel
            import cmake  # type: ignore
            cand = Path(cmake.CMAKE_BIN_DIR) / "cmake"
            if cand.exists():
                exe = str(cand)
        except Exception:
            pass
    if exe is None:
        raise KernelBuildError(
            "building the ParetoQ C++ kernels needs CMake >= 3.19, none found on PATH "
            "(install it: `pip install cmake` or `apt-get install cmake`)"
        )
    return exe


def _find_compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx or not (os.path.isabs(cxx) and os.path.exists(cxx) or shutil.which(cxx)):
        raise KernelBuildError(
            "building the ParetoQ C++ kernels needs a C++17 compiler, none found "
            "(set CXX, or install one: `apt-get install g++`)"
        )
    return cxx


def _torch_build_flags():
    import torch
    import torch.utils.cpp_extension as cpp

    return torch.__version__, [
        "-DPARETOQ_WITH_ATEN=ON", "-DPARETOQ_WITH_EXECUTORCH=OFF",
        "-DTORCH_INCLUDE_DIRS=" + ";".join(cpp.include_paths()),
        "-DTORCH_LIBRARY_DIR=" + cpp.library_paths()[0],
        f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]


CORE_ARCHIVE = "libparetoq_core.a"


def _variant(kind: str):
    """(runtime version string, cmake flags, (files to publish, their cmake targets), cache prefix) of
    a build kind. "core" is the kernels alone (the archive both registrations link; no runtime)."""
    if kind == "core":
        return "core", ["-DPARETOQ_WITH_EXECUTORCH=OFF"], ((CORE_ARCHIVE,), ("paretoq_core",)), "core"
    if kind == "executorch":
        pkg, ver = _executorch_dir()
        return f"et-{ver}|{pkg}", ["-DPARETOQ_WITH_EXECUTORCH=ON", f"-Dexecutorch_DIR={pkg / 'share' / 'cmake'}"], \
            ((LIB_NAME, TEST_BINARY, BENCH_BINARY), ("paretoq_et_kernels", TEST_BINARY, BENCH_BINARY)), \
            f"et-kernels-{ver}"
    if kind == "aten":
        ver, flags = _torch_build_flags()
        return f"torch-{ver}", flags, ((ATEN_LIB_NAME,), ("paretoq_aten_kernels",)), \
            f"aten-kernels-{ver.replace('+', '_')}"
    raise ValueError(f"unknown kernel build kind {kind!r} (expected 'executorch' or 'aten')")


def build_dir(kind: str = "executorch") -> Path:
    root, files = _sources()
    runtime, _, _, prefix = _variant(kind)
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    h.update(f"{runtime}|{platform.machine()}|{sys.platform}".encode())
    cache = Path(os.environ.get("PARETOQ_AO_CACHE") or Path.home() / ".cache" / "paretoq_ao")
    return cache / f"{prefix}-{h.hexdigest()[:16]}"


def build_kernels(verbose: bool = False, kind: str = "executorch") -> Path:
    """Build (if needed) and return the directory holding the library of ``kind`` ("executorch":
    also the C++ test binary and the kernel bench; "aten"). Both link one cached build of the
    kernels themselves (kind "core", ``libparetoq_core.a``), so the SIMD code compiles once."""
    out = build_dir(kind)
    _, flags, (publish, targets), _ = _variant(kind)
    lib = out / publish[0]
    if lib.exists():
        return out
    if kind != "core":
        flags = [*flags, f"-DPARETOQ_CORE_LIBRARY={build_kernels(verbose, 'core') / CORE_ARCHIVE}"]
    cmake = _find_cmake()
    cxx = _find_compiler()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / (out.name + ".lock"), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if lib.exists():  # another process built it meanwhile
            return out
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
        try:
            _cmake_build(cmake, cxx, tmp / "build", out.name, flags, targets, kind, verbose)
            for name in publish:
                shutil.copy2(tmp / "build" / name, tmp / name)
            shutil.rmtree(tmp / "build", ignore_errors=True)
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700: let other users of a shared cache read it
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def _cmake_build(cmake, cxx, build, build_id, flags, targets, kind, verbose):
    """Configure and build ``targets`` (only those) in ``build``; KernelBuildError with the tail of
    the compiler's output on failure."""
    cfg = [cmake, "-S", str(source_dir()), "-B", str(build), f"-DCMAKE_CXX_COMPILER={cxx}",
           "-DCMAKE_BUILD_TYPE=Release", f"-DPARETOQ_BUILD_ID={build_id}", *flags]
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    for cmd in (cfg, [cmake, "--build", str(build), "-j", jobs, "--target", *targets]):
        r = subprocess.run(cmd, capture_output=not verbose, text=True)
        if r.returncode != 0:
            raise KernelBuildError(
                f"building the ParetoQ {kind} kernels failed ({' '.join(cmd[:2])} ...):\n"
                f"{(r.stdout or '')[-4000:]}\n{(r.stderr or '')[-4000:]}"
            )


def _mapped_library(name: str = LIB_NAME) -> Optional[str]:
    """Path of a ParetoQ kernel library already mapped into this process (by anyone), if any."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if line.rstrip().endswith("/" + name):
                    return line.split(None, 5)[-1].strip()
    except OSError:  # pragma: no cover - non-Linux
        pass
    return None


def kernels_loaded() -> bool:
    return _loaded_path is not None or _mapped_library() is not None


def load_kernels(verbose: bool = False) -> str:
    """Build on first use and load the ExecuTorch kernel library exactly once; return its path.

    Idempotent and thread-safe. If a ParetoQ kernel library is already mapped into the process
    (e.g. loaded by hand), that one is used and no second copy is loaded (two copies registering
    the same kernels would abort the process).
    """
    global _loaded_path, _handle
    with _lock:
        if _loaded_path is not None:
            return _loaded_path
        import executorch.runtime  # noqa: F401  - the runtime (libexecutorch.so) the kernels register into

        path = _mapped_library()
        if path is None:
            path = str(build_kernels(verbose=verbose) / LIB_NAME)
        try:
            _handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise KernelBuildError(f"could not load the ParetoQ kernel library {path}: {e}") from e
        for name, res in (("paretoq_build_id", ctypes.c_char_p), ("paretoq_kernel_path", ctypes.c_char_p),
                          ("paretoq_call_count", ctypes.c_longlong), ("paretoq_set_num_threads", ctypes.c_int)):
            getattr(_handle, name).restype = res
        _handle.paretoq_call_count.argtypes = [ctypes.c_int]
        _handle.paretoq_set_num_threads.argtypes = [ctypes.c_int]
        _loaded_path = path
        return path


def load_aten_kernels(verbose: bool = False) -> str:
    """Build on first use and load the PyTorch (ATen) kernel library exactly once (``torch.ops.
    paretoq_cpu.*``); return its path. Idempotent and thread-safe; a copy already mapped into the
    process (loaded by hand) is reused, never loaded twice."""
    global _aten_path
    with _lock:
        if _aten_path is not None:
            return _aten_path
        import torch

        path = _mapped_library(ATEN_LIB_NAME)
        if path is None:
            path = str(build_kernels(verbose=verbose, kind="aten") / ATEN_LIB_NAME)
            try:
                torch.ops.load_library(path)
            except OSError as e:
                raise KernelBuildError(f"could not load the ParetoQ ATen kernel library {path}: {e}") from e
        _aten_path = path
        return path


def kernel_library_handle() -> ctypes.CDLL:
    load_kernels()
    assert _handle is not None
    return _handle
