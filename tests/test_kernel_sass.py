"""benchmarks/kernel_sass.py: the SASS parser on a fixed listing, and the static properties of the
word kernels on real sm_90 code (compiled with Triton's bundled ptxas; skipped if it is missing).

The second part guards the kernels' code generation: the word GEMV must keep its K loop free of
shared memory, barriers and integer-to-float conversions, and take fewer instructions per code
than the byte GEMV it replaces; the word GEMM likewise against the byte tl.dot kernel.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "kernel_sass.py")

LISTING = """
        code for sm_90
                Function : _gemv_words_kernel
        .headerflags    @"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                     /* 0x00000a00ff017b82 */
                                                                              /* 0x000fe40000000800 */
        /*0010*/                   S2R R0, SR_CTAID.X ;                       /* 0x0000000000007919 */
                                                                              /* 0x000e220000002500 */
        /*0020*/               @P0 LDG.E.64 R2, desc[UR12][R4.64] ;           /* 0x0000000c04020981 */
                                                                              /* 0x000fe20000000800 */
        /*0030*/                   LOP3.LUT R6, R2, 0x6, R7, 0xf8, !PT ;      /* 0x0000000602067812 */
                                                                              /* 0x000fe40000000800 */
        /*0040*/                   FADD R6, R6, -8388608 ;                    /* 0x4b00000006067421 */
                                                                              /* 0x000fe40000000800 */
        /*0050*/                   FFMA R9, R6, R8, R9 ;                      /* 0x0000000806097223 */
                                                                              /* 0x000fe40000000800 */
        /*0060*/              @!P1 BRA 0x20 ;                                 /* 0xfffffffc00e08947 */
                                                                              /* 0x000fea000383ffff */
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;              /* 0x0000000000007b1d */
                                                                              /* 0x000fec0000010000 */
        /*0080*/                   EXIT ;                                     /* 0x000000000000794d */
                                                                              /* 0x000fea0003800000 */
        /*0090*/                   BRA 0x90;                                  /* 0xfffffffc00fc7947 */
"""


@pytest.fixture(scope="module")
def ks():
    sys.path.insert(0, os.path.dirname(SCRIPT))  # the script imports its sibling _meta.py
    try:
        spec = importlib.util.spec_from_file_location("kernel_sass", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(os.path.dirname(SCRIPT))
    return mod


def test_parser_finds_the_loop(ks):
    instrs = ks.parse_sass(LISTING)
    assert [a for a, _ in instrs] == list(range(0, 0xA0, 0x10))
    assert ks.opcode("@!P1 BRA 0x20") == "BRA"
    assert ks.opcode("@P0 LDG.E.64 R2, desc[UR12][R4.64]") == "LDG"
    loop = ks.main_loop(instrs)
    # 0x20 .. 0x60: the barrier after the loop and the self-branch at the end are not in it
    assert loop == {"LDG": 1, "LOP3": 1, "FADD": 1, "FFMA": 1, "BRA": 1}
    assert ks.main_loop(ks.parse_sass(LISTING.replace("@!P1 BRA 0x20", "NOP"))) is None
    assert ks.resource_usage("Function _k:\n REG:96 STACK:0 SHARED:512 LOCAL:8 CONSTANT[0]:0") == (
        96, 8, 512)
    assert ks.resource_usage("nothing here") is None


def test_cli_rejects_bad_arguments():
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, SCRIPT, "--bits", "two"], capture_output=True, text=True,
                       env=env, timeout=600)
    if r.returncode == 3:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 2 and "--bits" in r.stderr
    r = subprocess.run([sys.executable, SCRIPT, "--m", "0"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 2 and "--m" in r.stderr
    r = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True,
                       env=dict(os.environ, TRITON_INTERPRET="1"), timeout=600)
    assert r.returncode == 2 and "TRITON_INTERPRET" in r.stderr


def _run_report(tmp_path, *args):
    out = tmp_path / "sass.md"
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, SCRIPT, "--out", str(out), *args], capture_output=True,
                       text=True, env=env, timeout=900)
    if r.returncode == 3:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {}
    for line in out.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 15 and cells[0].isdigit():
            rows[(int(cells[0]), cells[1], cells[2])] = cells
    return out.read_text(), rows


def test_word_kernels_beat_byte_kernels_on_sm90(tmp_path):
    text, rows = _run_report(tmp_path, "--bits", "2", "--m", "1,16")
    assert "not timings" in text and "sm_90" in text
    vw, v = rows[(1, "gemvw", "2")], rows[(1, "gemv", "2")]
    gw, g = rows[(16, "gemmw", "2")], rows[(16, "gemm", "2")]
    per_code = {k: float(r[9]) for k, r in
                (("gemvw", vw), ("gemv", v), ("gemmw", gw), ("gemm", g))}
    # the word GEMV: no shared memory, barrier or int->float conversion inside the K loop
    assert (vw[10], vw[11], vw[12]) == ("0", "0", "0"), vw
    assert vw[6] == "0" and gw[6] == "0"  # no spills
    assert per_code["gemvw"] < 0.7 * per_code["gemv"], per_code
    assert per_code["gemvw"] < 4.5, per_code  # 3 per code + the shared loads and shifts
    assert gw[12] == "0", gw  # the word GEMM decodes without conversions
    assert per_code["gemmw"] < 0.7 * per_code["gemm"], per_code
