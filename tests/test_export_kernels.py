"""C++ unit tests of the kernel library (every SIMD path vs the scalar reference, odd shapes,
every bit width), built by the same CMake as the ExecuTorch library and run from pytest; plus
the NEON path cross-compiled for AArch64 and run under qemu (skipped without the toolchain)."""

import os
import shutil
import subprocess

import pytest

from paretoq_ao.export import _build


def test_cpp_kernel_unit_tests():
    out = _build.build_kernels()
    r = subprocess.run([str(out / _build.TEST_BINARY)], capture_output=True, text=True, timeout=120)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and "0 failures" in r.stdout
    assert "int8-vs-fp32 worst relative L2 error" in r.stdout


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
    r = subprocess.run([_QEMU, "-L", "/usr/aarch64-linux-gnu", str(build / _build.TEST_BINARY)],
                       capture_output=True, text=True, timeout=300)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "testing neon" in r.stdout and "0 failures" in r.stdout
