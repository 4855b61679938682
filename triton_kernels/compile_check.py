"""Compile the kernels for a GPU target without a GPU (Triton's bundled ptxas), to catch code the
interpreter accepts but the GPU compiler rejects (tl.dot tiles < 16, layouts, dtypes, atomics).

    python -m paretoq_ao.triton_kernels.compile_check            # every format/mode/dtype, 2 tiles
    python -m paretoq_ao.triton_kernels.compile_check --configs  # every autotune candidate (3-bit)
    python -m paretoq_ao.triton_kernels.compile_check --quick    # a handful (used by the tests)

Needs ``TRITON_INTERPRET`` unset (the kernels must be real ``triton.jit`` functions). Prints one
line per failure and exits with status 1 if any kernel failed to compile, 3 if the toolchain
(Triton's NVIDIA backend with its bundled ptxas) is missing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

from paretoq_ao.formats import SCALE_EPS

_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_kernel(cfg, code_bits: int, mode: int, x_dtype=torch.float16, atomic: bool = False,
                   aligned: bool = True, arch: int = 90, group_size: int = 128):
    """Compile the kernel of ``cfg.kind`` for ``cfg`` on cuda:sm_<arch>; returns the kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import linear as L

    x = _DT[x_dtype]
    words = cfg.kind in ("gemvw", "gemmw")  # the packed rows are read as int32 words
    gemm = cfg.kind in ("gemm", "gemmw")
    sig = {"x_ptr": f"*{x}", "w_ptr": "*i32" if words else "*u8", "s_ptr": f"*{x}",
           "out_ptr": "*fp32" if atomic else f"*{x}"}
    ints = (["M"] if gemm else []) + [
        "N", "K", "row_words" if cfg.kind == "gemvw" else "row_bytes", "k_per_split", "stride_xm",
        "stride_om", "stride_wn", "stride_sn", "stride_sg"] + (["zero_i"] if cfg.kind != "gemv" else [])
    for name in ints:
        sig[name] = "i32"
    cons = dict(
        CODE_BITS=code_bits, TWO_ZERO=8.0,
        HALF_STEP=0.5, SCALE_MODE=mode, GROUP_SIZE=group_size if mode else 1, SCALE_EPS_=SCALE_EPS,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, ATOMIC=atomic,
    )
    if cfg.kind == "gemvw":
        cons["EVEN_K"] = aligned
    else:
        cons["PER_UNIT"] = L._per_unit(code_bits)
    if gemm:
        prec = None if x_dtype != torch.float32 else "ieee"
        cons.update(BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m, DOT_PRECISION=prec,
                    WORDS_IN=cfg.kind == "gemmw")
    for name in cons:
        sig[name] = "constexpr"
    attrs = {}
    if aligned:  # what a launch with 16-divisible pointers, sizes and strides specialises to
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig)
                 if sig[name] != "constexpr" and name not in ("stride_sg", "zero_i")}
    fn = {"gemm": L._gemm_kernel, "gemmw": L._gemm_kernel, "gemv": L._gemv_kernel,
          "gemvw": L._gemv_words_kernel}[cfg.kind]
    src = ASTSource(fn=fn, signature=sig, constexprs=cons, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def compile_trits5(tile, per_row: bool, x_dtype=torch.float16, arch: int = 90):
    """Compile the trits5 (ternary) kernel of trits5.py for one (BLOCK_M, BLOCK_N, BLOCK_K, warps)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import trits5 as T

    x = _DT[x_dtype]
    sig = {"x_ptr": f"*{x}", "w_ptr": "*u8", "s_ptr": f"*{x}", "out_ptr": f"*{x}"}
    for name in ("M", "N", "K", "row_bytes", "stride_xm", "stride_om", "stride_wn", "stride_sn", "stride_sg"):
        sig[name] = "i32"
    bm, bn, bk, warps = tile
    cons = dict(HALF_STEP=1 / 3, PER_ROW=per_row, GROUP_SIZE=1 if per_row else 64, SCALE_EPS_=SCALE_EPS,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PRECISION=None if x_dtype != torch.float32 else "ieee")
    for name in cons:
        sig[name] = "constexpr"
    src = ASTSource(fn=T._trits5_kernel, signature=sig, constexprs=cons, attrs={})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": 2})


def _trits5_jobs(which: str):
    from .trits5 import TRITS5_CONFIGS

    tiles = list(TRITS5_CONFIGS.values())
    if which == "quick":
        yield tiles[0], True, torch.float16
        yield tiles[-1], False, torch.bfloat16
        return
    for tile, per_row, dt in itertools.product(tiles, (True, False), tuple(_DT)):
        yield tile, per_row, dt


def _jobs(which: str):
    from .linear import KernelConfig
    from . import tuning

    g = KernelConfig("gemm", block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3)
    g16 = KernelConfig("gemm", block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=3)
    v = KernelConfig("gemv", block_n=32, block_k=128, num_warps=4)
    vw = KernelConfig("gemvw", block_n=128, block_k=256, num_warps=4)
    gw = KernelConfig("gemmw", block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3)
    if which == "quick":
        yield g16, 3, 2, torch.float16, True, False
        yield g, 1, 1, torch.bfloat16, False, True
        yield g, 4, 0, torch.float32, False, True
        yield v, 3, 1, torch.float16, True, True
        yield v, 2, 2, torch.bfloat16, False, False
        yield vw, 2, 0, torch.bfloat16, False, True
        yield vw, 1, 1, torch.float16, True, False
        yield gw, 2, 1, torch.bfloat16, False, True
        yield gw, 1, 2, torch.float32, True, False
        yield vw, 3, 0, torch.float16, False, False
        yield gw, 3, 1, torch.bfloat16, True, True
        return
    if which == "configs":
        seen = set()
        from .linear import Problem

        narrow = Problem(M=64, N=4096, K=4096, bits=3, code_bits=3, groups=128,
                         x_dtype=torch.float16, out_dtype=torch.float16, dot_precision=None,
                         device="x")
        for c in (tuning._gemv_candidates() + tuning._small_candidates(64)
                  + tuning._small_candidates(16) + tuning._large_candidates()
                  + tuning._gemv_candidates(problem=narrow) + tuning._small_candidates(4, narrow)
                  + tuning._large_candidates(narrow)):
            if c not in seen:
                seen.add(c)
                yield c, 3, 1, torch.float16, c.split_k > 1, True
        for c in tuning._word_candidates():
            if c not in seen:
                seen.add(c)
                yield c, 2, 0, torch.bfloat16, c.split_k > 1, True
        return
    for c, cb, mode, dt, atomic in itertools.product(
            (g, g16, v, vw, gw), (1, 2, 3, 4), (0, 1, 2), tuple(_DT), (False, True)):
        if c is vw and mode == 2:
            continue  # the word GEMV does not serve groups narrower than its K tile
        yield c, cb, mode, dt, atomic, cb != 4


def toolchain_problem(arch: int = 90):
    """None when Triton's NVIDIA backend and its ptxas are usable here, else the reason."""
    try:
        import triton.backends as tb
        from triton.backends.nvidia.compiler import get_ptxas

        if "nvidia" not in tb.backends:
            return "Triton has no NVIDIA backend"
        tool = get_ptxas(arch)
        path = getattr(tool, "path", None)
        if not path or not os.path.exists(path):
            return f"ptxas not found ({path})"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    grp = ap.add_mutually_exclusive_group()
    grp.add_argument("--quick", action="store_true")
    grp.add_argument("--configs", action="store_true")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    args = ap.parse_args(argv)
    from paretoq_ao.ops import triton_interpreting

    if triton_interpreting():
        print("compile_check: unset TRITON_INTERPRET (kernels must be compiled, not interpreted)")
        return 2
    problem = toolchain_problem(args.arch)
    if problem:
        print(f"compile_check: SKIP: {problem}")
        return 3
    which = "quick" if args.quick else ("configs" if args.configs else "formats")
    fails = n = 0
    t0 = time.time()
    for cfg, cb, mode, dt, atomic, aligned in _jobs(which):
        n += 1
        try:
            compile_kernel(cfg, cb, mode, dt, atomic, aligned, arch=args.arch,
                           group_size=128 if mode == 1 else 24)
        except Exception as e:  # noqa: BLE001
            fails += 1
            print(f"FAIL {cfg} code_bits={cb} scale_mode={mode} {dt} atomic={atomic} "
                  f"aligned={aligned}: {type(e).__name__}: {str(e)[:500]}", flush=True)
    for tile, per_row, dt in _trits5_jobs(which):
        n += 1
        try:
            compile_trits5(tile, per_row, dt, arch=args.arch)
        except Exception as e:  # noqa: BLE001
            fails += 1
            print(f"FAIL trits5 tile={tile} per_row={per_row} {dt}: {type(e).__name__}: {str(e)[:500]}", flush=True)
    print(f"compile_check ({which}, sm_{args.arch}): {n - fails}/{n} kernels compiled "
          f"in {time.time() - t0:.0f}s")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
