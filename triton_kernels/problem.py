"""Host side of the Triton ``paretoq::linear`` kernels: launch configurations, the problem
description the autotuner keys on, argument validation. No kernels here (linear.py, trits5.py),
so the autotuner (tuning.py) and the kernels both import this module and not each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from paretoq_ao.formats import get_format
from paretoq_ao.ops import check_linear_args, triton_interpreting
from paretoq_ao.packing import LAYOUT as LAYOUT_READ  # noqa: F401  - the layout the kernels read (rowbits + trits5)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The largest M served by the GEMV kernels (they use grid axis 2 for M, one program per row).
GEMV_MAX_M = 8
KERNEL_KINDS = ("gemv", "gemvw", "gemm", "gemmw")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``; the same
    test as the op's routing, ``paretoq_ao.ops.triton_interpreting``)."""
    return triton_interpreting()


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration. ``kind``: "gemv" / "gemvw" (no tensor cores; bytes / word units)
    or "gemm" / "gemmw" (tl.dot; bytes / word units). The word kinds need rows of whole words."""

    kind: str
    block_n: int
    block_k: int
    block_m: int = 1
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 2

    def check(self) -> "KernelConfig":
        def pow2(v):
            return v >= 1 and (v & (v - 1)) == 0

        if self.kind not in KERNEL_KINDS:
            raise ValueError(f"KernelConfig.kind must be one of {KERNEL_KINDS}, got {self.kind!r}")
        if not all(pow2(v) for v in (self.block_n, self.block_k, self.block_m, self.num_warps)):
            raise ValueError(f"block sizes and num_warps must be powers of two: {self}")
        if self.block_k < 8:
            raise ValueError(f"block_k must be >= 8 (a tile holds whole units of 8 codes): {self}")
        if self.kind in ("gemvw", "gemmw") and self.block_k < 32:
            raise ValueError(f"{self.kind} needs block_k >= 32 (whole 32-bit words of codes): {self}")
        if self.kind in ("gemm", "gemmw") and min(self.block_m, self.block_n, self.block_k) < 16:
            raise ValueError(f"tl.dot tiles need BLOCK_M/N/K >= 16 (GPU-legal): {self}")
        if self.split_k < 1 or self.group_m < 1 or self.num_stages < 1:
            raise ValueError(f"split_k, group_m and num_stages must be >= 1: {self}")
        return self

    @classmethod
    def from_any(cls, cfg) -> "KernelConfig":
        if isinstance(cfg, KernelConfig):
            return cfg.check()
        if isinstance(cfg, dict):
            return cls(**cfg).check()
        raise TypeError(f"config must be a KernelConfig or a dict of its fields, got {type(cfg)}")


@dataclass(frozen=True)
class Problem:
    """What a launch depends on besides the config (also the autotuner's raw key material)."""

    M: int
    N: int
    K: int
    bits: float
    code_bits: int
    groups: int
    x_dtype: torch.dtype
    out_dtype: torch.dtype
    dot_precision: Optional[str]
    device: str  # device name (part of the tuning key)
    num_sms: int = 1  # streaming multiprocessors (0/1 on the CPU interpreter)
    smem_bytes: int = 0  # shared memory a block may opt into (0: unknown)
    word_aligned: bool = False  # packed rows readable as int32 words (see words_view)

    @property
    def group_size(self) -> int:
        return self.K // self.groups


def rows_are_words(packed: torch.Tensor) -> bool:
    """Whether every row of ``packed`` is a whole number of 4-byte-aligned words (row bytes, row
    stride and data pointer divisible by 4): what the word kernels need."""
    if packed.dim() != 2 or packed.shape[0] == 0 or packed.shape[1] == 0:
        return False
    if packed.shape[1] % 4 or packed.stride(1) != 1 or packed.data_ptr() % 4:
        return False
    return packed.shape[0] == 1 or packed.stride(0) % 4 == 0


def words_view(packed: torch.Tensor) -> Optional[torch.Tensor]:
    """``packed`` reinterpreted as int32 words ``[N, row_bytes / 4]`` when ``rows_are_words``,
    else None. Word ``j`` of a row holds its bytes ``4j .. 4j + 3`` little-endian, i.e. the codes'
    bit stream unchanged (CUDA GPUs and x86 are little-endian)."""
    return packed.view(torch.int32) if rows_are_words(packed) else None


def unit_codes(code_bits: int) -> int:
    """Codes per word unit of the word kernels: 32 / b for b = 1, 2, 4; 32 (three words) for 3."""
    return 32 if code_bits == 3 else 32 // code_bits


def word_gemm_ok(problem: Problem, cfg: KernelConfig) -> bool:
    """Whether the "gemmw" config can serve the problem: rows of whole 4-byte-aligned words and
    K tiles of whole word units (any scale layout; per-element group scales included)."""
    return problem.word_aligned and cfg.block_k % unit_codes(problem.code_bits) == 0


def word_kernel_ok(problem: Problem, cfg: KernelConfig) -> bool:
    """Whether the "gemvw" config can serve the problem: what "gemmw" needs, plus per-row scales
    or groups that hold whole K tiles, and an M small enough for the GEMV grid."""
    return (word_gemm_ok(problem, cfg) and problem.M <= GEMV_MAX_M
            and (problem.groups == 1 or problem.group_size % cfg.block_k == 0))


_WORD_NEEDS = {
    "gemvw": ("the word GEMV needs M <= %d, rows of whole 4-byte-aligned words, K tiles of whole "
              "units and groups holding whole K tiles" % GEMV_MAX_M),
    "gemmw": "the word GEMM needs rows of whole 4-byte-aligned words and K tiles of whole units",
}


def _words_for(problem: Problem, cfg: KernelConfig, packed: torch.Tensor) -> torch.Tensor:
    """The int32 view a word-kernel config reads, or ValueError naming why it cannot serve."""
    ok = word_kernel_ok if cfg.kind == "gemvw" else word_gemm_ok
    if not ok(problem, cfg):
        raise ValueError(
            f"triton_linear: config {cfg} cannot serve this problem ({_WORD_NEEDS[cfg.kind]}): "
            f"M={problem.M}, N={problem.N}, K={problem.K}, bits={problem.bits}, packed "
            f"{tuple(packed.shape)} strides {tuple(packed.stride())}, groups={problem.groups}")
    return packed.view(torch.int32)


def scale_mode(problem: Problem, cfg: KernelConfig) -> int:
    """0: per-row scale in the epilogue; 1: one scale per K tile; 2: per-element scale gather."""
    if problem.groups == 1:
        return 0
    return 1 if problem.group_size % cfg.block_k == 0 else 2


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_plan(K: int, block_k: int, split_k: int):
    """(splits actually launched, K columns per split); every split starts on a tile boundary."""
    k_tiles = _cdiv(K, block_k)
    split = max(1, min(split_k, k_tiles))
    tiles_per_split = _cdiv(k_tiles, split)
    split = _cdiv(k_tiles, tiles_per_split)  # no empty splits
    return split, tiles_per_split * block_k


def _per_unit(code_bits: int) -> int:
    """Codes per unit of ``_load_unit_codes``: 8 for b = 3 (three bytes), else 8 / b (one byte)."""
    return 8 if code_bits == 3 else 8 // code_bits


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def _validate(x, packed, scale, bits, out_dtype):
    if not all(isinstance(t, torch.Tensor) for t in (x, packed, scale)):
        raise TypeError(
            "triton_linear: x, packed and scale must be tensors, got "
            f"{type(x).__name__}, {type(packed).__name__}, {type(scale).__name__}"
        )
    supported = ", ".join(_dtype_name(d) for d in SUPPORTED_DTYPES)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"triton_linear: activations of dtype {_dtype_name(x.dtype)} (shape {tuple(x.shape)}) "
            f"are not supported; supported: {supported}"
        )
    if scale.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"triton_linear: scale of dtype {_dtype_name(scale.dtype)} (shape {tuple(scale.shape)}) "
            f"is not supported; supported: {supported}"
        )
    if out_dtype is not None and out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"triton_linear: out_dtype={out_dtype} is not supported; supported: {supported}"
        )
    if scale.dim() == 2 and scale.shape[1] == 0:  # check_linear_args would divide by zero
        raise ValueError(f"triton_linear: scale of shape {tuple(scale.shape)} has no groups "
                         "(expected [N, 1] or [N, K // group_size])")
    # Shapes, packed dtype, K match, devices agree (the op's own checks, same messages).
    fmt = check_linear_args(x, packed, scale, bits)
    dev = packed.device
    if interpreting():
        if dev.type != "cpu":
            raise ValueError(
                f"triton_linear: under TRITON_INTERPRET=1 the tensors must be on the CPU, got {dev}"
            )
    elif dev.type != "cuda":
        raise ValueError(
            f"triton_linear: tensors must be on a CUDA device, got {dev} (x {tuple(x.shape)}, "
            f"packed {tuple(packed.shape)}); use paretoq_ao.ops.reference_linear on the CPU or "
            "set TRITON_INTERPRET=1 before importing triton to run the kernels interpreted"
        )
    if packed.shape[1] and packed.stride(1) != 1:
        raise ValueError(
            f"triton_linear: packed rows must be contiguous (stride(1) == 1), got strides "
            f"{tuple(packed.stride())} for shape {tuple(packed.shape)}"
        )
    return fmt


def _dot_precision(x_dtype) -> Optional[str]:
    if x_dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def make_problem(x2, packed, scale, fmt, out_dtype) -> Problem:
    M, K = x2.shape
    name, sms, smem = _device_info(packed.device)
    return Problem(
        M=M, N=packed.shape[0], K=K, bits=fmt.bits, code_bits=fmt.code_bits,
        groups=scale.shape[1], x_dtype=x2.dtype, out_dtype=out_dtype,
        dot_precision=_dot_precision(x2.dtype), device=name, num_sms=sms, smem_bytes=smem,
        word_aligned=rows_are_words(packed),
    )


_DEVICE_INFO = {}


def _device_info(dev: torch.device):
    key = (dev.type, dev.index)
    if key not in _DEVICE_INFO:
        if dev.type == "cuda":
            props = torch.cuda.get_device_properties(dev)
            smem = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
            _DEVICE_INFO[key] = (props.name, int(props.multi_processor_count), smem)
        else:
            _DEVICE_INFO[key] = (dev.type, 1, 0)
    return _DEVICE_INFO[key]


def _prepare(x, packed, scale, bits, out_dtype, validate=True):
    """Validate (unless the caller did) and normalise the arguments: (problem, x2 [M, K], scale,
    out_dtype) or None for an empty problem."""
    fmt = _validate(x, packed, scale, bits, out_dtype) if validate else get_format(bits)
    out_dtype = out_dtype or x.dtype
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if K and x2.shape[0] and x2.stride(-1) != 1:
        x2 = x2.contiguous()  # the K dimension must be unit-stride (documented copy)
    if x2.shape[0] == 0 or packed.shape[0] == 0 or K == 0:
        return None, x2, scale, out_dtype
    if interpreting():  # the interpreter has no bf16 arithmetic: compute in fp32
        if x2.dtype == torch.bfloat16:
            x2 = x2.float()
        if scale.dtype == torch.bfloat16:
            scale = scale.float()
    kernel_out = torch.float32 if (interpreting() and out_dtype == torch.bfloat16) else out_dtype
    return make_problem(x2, packed, scale, fmt, kernel_out), x2, scale, out_dtype


def supports(x, packed, scale, bits, out_dtype=None) -> bool:
    """True when ``triton_linear`` accepts these arguments (no exception), e.g. to route
    ``paretoq::linear`` on CUDA: CUDA tensors (CPU under the interpreter), x / scale / out dtype in
    float16, bfloat16, float32, a known bit width, consistent shapes, packed rows contiguous."""
    try:
        _validate(x, packed, scale, bits, out_dtype)
    except (TypeError, ValueError):
        return False
    return True
