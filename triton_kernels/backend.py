"""The ``triton`` backend of the ParetoQ linear ops (registered through the ``paretoq_ao.backends``
entry point; see paretoq_ao/backends.py).

It serves ``paretoq::linear`` (float activations) on CUDA tensors, and on CPU tensors while
``TRITON_INTERPRET=1`` (Triton's interpreter, which is how the tests check the kernels on a CPU);
activations and scales in float16 / bfloat16 / float32, packed rows contiguous. Importing this
module does not import triton: the kernels are imported on the first call they serve.
"""

from __future__ import annotations

from typing import Optional

import torch

from paretoq_ao import backends
from paretoq_ao.ops import triton_interpreting

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NOT_HERE = "not a CUDA tensor and TRITON_INTERPRET is not set"


def _supports(call: backends.LinearCall) -> Optional[str]:
    if call.input.device.type != "cuda" and not triton_interpreting():
        return _NOT_HERE
    if call.int8_act:
        return "int8 activations (paretoq::linear_8da) have no Triton kernel"
    if call.input.dtype not in _DTYPES:
        return f"{call.input.dtype} activations (the kernels take float16, bfloat16, float32)"
    if call.scale.dtype not in _DTYPES:
        return f"{call.scale.dtype} scales (the kernels take float16, bfloat16, float32)"
    if call.packed.shape[1] and call.packed.stride(1) != 1:
        return f"packed rows that are not contiguous (strides {tuple(call.packed.stride())})"
    return None


def _run(call: backends.LinearCall) -> torch.Tensor:
    import paretoq_ao.triton_kernels as tk  # looked up at each call (tests spy on it)

    return tk.triton_linear(call.input, call.packed, call.scale, call.fmt.bits, validate=False)


BACKEND = backends.LinearBackend(
    name="triton", device_types=("cuda", "cpu"), priority=20, supports=_supports, run=_run,
    quiet=lambda reason: reason == _NOT_HERE,
)


def activate() -> None:
    backends.register_backend(BACKEND)
