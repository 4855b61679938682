"""Triton kernels for ``paretoq::linear`` on CUDA (installed as ``paretoq_ao.triton_kernels``).

    from paretoq_ao.triton_kernels import triton_linear, warmup
    y = triton_linear(x, packed, scale, bits)     # == paretoq_ao.ops.reference_linear(...)
    warmup((1, 4096, 4096, 2), (16, 4096, 4096, 2, 64))   # tune before CUDA-graph capture

Fused unpack + dequantize + matmul reading the canonical packed layout of packing.py (see
linear.py for the kernels and tuning.py for the autotuner). Importing this package registers
nothing with torch.library.
"""

from .linear import LAYOUT_READ, SUPPORTED_DTYPES, KernelConfig, supports, triton_linear
from .tuning import (
    clear_cache, default_config, load_configs, model_shapes, save_configs, tuned_configs, warmup,
)

__all__ = [
    "triton_linear", "supports", "warmup", "model_shapes", "tuned_configs", "clear_cache",
    "default_config", "KernelConfig", "LAYOUT_READ", "SUPPORTED_DTYPES", "save_configs",
    "load_configs",
]
