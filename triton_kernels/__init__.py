"""Triton kernels for ``paretoq::linear`` on CUDA (installed as ``paretoq_ao.triton_kernels``).

    from paretoq_ao.triton_kernels import triton_linear, warmup
    y = triton_linear(x, packed, scale, bits)     # == paretoq_ao.ops.reference_linear(...)
    warmup((1, 4096, 4096, 2), (16, 4096, 4096, 2, 64))   # tune before CUDA-graph capture

Fused unpack + dequantize + matmul reading the canonical packed layout of packing.py (see
linear.py for the kernels, problem.py for their host side, tuning.py for the autotuner and
precompile.py for tuning ahead of time (warmup); backend.py registers them as the
"triton" backend of paretoq::linear). Importing this package registers nothing with torch.library
and does not import triton: the names below are loaded on first access.
"""

import importlib

_LAZY = {
    "triton_linear": "linear", "supports": "linear", "KernelConfig": "linear", "LAYOUT_READ": "linear",
    "SUPPORTED_DTYPES": "linear", "warmup": "precompile", "model_shapes": "precompile", "tuned_configs": "tuning",
    "clear_cache": "tuning", "default_config": "tuning", "save_configs": "tuning", "load_configs": "tuning",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "triton_linear", "supports", "warmup", "model_shapes", "tuned_configs", "clear_cache",
    "default_config", "KernelConfig", "LAYOUT_READ", "SUPPORTED_DTYPES", "save_configs",
    "load_configs",
]
