"""C++ unit tests of the kernel library (every SIMD path vs the scalar reference, bit-exact in both
activation modes, odd shapes, every bit width and group layout, M bands), built by the same CMake
as the ExecuTorch library and run from pytest; plus the NEON paths (baseline and dot-product)
cross-compiled for AArch64 and run under qemu (skipped without the toolchain); and the C++ format
table against formats.py."""

import os
import shutil
import subprocess

import pytest

from paretoq_ao.export import _build, _formats_gen


def test_cpp_kernel_unit_tests():
    out = _build.build_kernels()
    r = subprocess.run([str(out / _build.TEST_BINARY)], capture_output=True, text=True, timeout=120)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and "0 failures" in r.stdout
    assert "int8-vs-fp32 worst relative L2 error" in r.stdout
    if _build.platform.machine() == "x86_64":  # both x86 paths are compiled; each runs where the CPU has it
        flags = _cpu_flags()
        assert "testing avx2" in r.stdout
        avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi", "avx512_vbmi2"} <= flags
        assert ("avx512" in r.stdout.splitlines()[0]) == avx512, (r.stdout.splitlines()[0], sorted(flags))


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(l for l in f if l.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def test_cpp_format_table_is_generated_from_formats_py():
    """csrc/formats_table.h is exactly what formats.py renders (regenerate with
    python -m paretoq_ao.export._formats_gen)."""
    assert _formats_gen.HEADER.read_text() == _formats_gen.render()
    from paretoq_ao.formats import FORMATS
    text = _formats_gen.render()
    for fmt in FORMATS.values():
        assert f"// {fmt}" in text


def test_cpp_kernel_tests_scalar_only_path_forced():
    out = _build.build_kernels()
    env = dict(os.environ, PARETOQ_KERNEL_PATH="scalar")
    r = subprocess.run([str(out / _build.TEST_BINARY)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("best path: scalar")


_CROSS = shutil.which("aarch64-linux-gnu-g++")
_QEMU = shutil.which("qemu-aarch64")


@pytest.mark.skipif(not (_CROSS and _QEMU and shutil.which("cmake")),
                    reason="NEON test needs g++-aarch64-linux-gnu and qemu-user "
                           "(apt-get install g++-aarch64-linux-gnu qemu-user)")
def test_neon_path_under_qemu(tmp_path):
    build = tmp_path / "build"
    cfg = ["cmake", "-S", str(_build.source_dir()), "-B", str(build), "-DPARETOQ_WITH_EXECUTORCH=OFF",
           "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
           f"-DCMAKE_CXX_COMPILER={_CROSS}", "-DCMAKE_BUILD_TYPE=Release"]
    subprocess.run(cfg, check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "2", "--target", _build.TEST_BINARY],
                   check=True, capture_output=True)
    # qemu's default CPU has the dot-product instructions: it runs the neondot path only (the variable
    # limits the run); a Cortex-A53 has not, so dispatch must pick plain NEON there. Both run at once.
    runs = {"neondot": ([], {"PARETOQ_TEST_PATHS": "neondot"}, "testing neondot\n"),
            "cortex-a53": (["-cpu", "cortex-a53"], {}, "best path: neon; testing neon\n")}
    procs = {}
    for name, (cpu, env, _) in runs.items():
        cmd = [_QEMU] + cpu + ["-L", "/usr/aarch64-linux-gnu", str(build / _build.TEST_BINARY)]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env={**os.environ, **env})
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        print(name, out)
        assert proc.returncode == 0, f"{name}: {out}"
        assert runs[name][2] in out and "0 failures" in out, f"{name}: {out}"
