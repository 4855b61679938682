"""ExecuTorch export and the C++ low-bit kernel library (installed as ``paretoq_ao.export``).

    from paretoq_ao.export import export_executorch, load_executorch
    export_executorch(converted_model, (example_input,), "model.pte")   # packed linears -> our op
    forward = load_executorch("model.pte")                                # builds/loads kernels once
    out = forward(example_input)

* ``load_kernels()`` builds export/csrc with CMake on first use (cached under
  ``~/.cache/paretoq_ao``) and loads it exactly once; it returns the library path.
* The kernels read the ``paretoq-rowbits-v1`` layout in place (see csrc/paretoq_kernels.h).
* Activations: the program records them per layer, as the op each layer calls:
  ``paretoq::linear`` (float activations, matching the eager model to float rounding) or
  ``paretoq::linear_8da`` (dynamic int8 per token, integer dot products: faster). The default of
  ``export_executorch`` is ``activations="int8"`` (the choice of torchao's 8da4w programs);
  ``activations=None`` keeps each layer's own setting (``ParetoQPackedTensor.activations``).
  float32 models only.
* Every non-ParetoQ op goes to XNNPACK (``XnnpackPartitioner``).
* The same C++ library serves eager PyTorch / ``torch.compile`` on CPUs (``cpu_backend``).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from . import _ops  # noqa: F401  - registers paretoq::linear.out
from ._build import KernelBuildError, build_kernels, kernels_loaded, load_kernels, source_dir
from ._reference import reference_linear_int8

__all__ = [
    "load_kernels", "build_kernels", "kernels_loaded", "KernelBuildError", "source_dir",
    "export_executorch", "load_executorch", "program_activations", "kernel_path", "kernel_call_count",
    "set_num_threads", "reference_linear_int8", "MissingKernelsError", "ACTIVATION_OPS",
]

# The operator a layer calls records its activation mode in the program.
ACTIVATION_OPS = {"float": "paretoq::linear", "int8": "paretoq::linear_8da"}
_OP_NAMES = tuple(f"{op}.out" for op in ACTIVATION_OPS.values())


class MissingKernelsError(RuntimeError):
    """A program uses ParetoQ operators but the kernel library is not loaded."""


def kernel_path() -> str:
    """The SIMD path the kernels use on this CPU (scalar / avx2 / avx512 / neon / neondot)."""
    from ._build import kernel_library_handle
    return kernel_library_handle().paretoq_kernel_path().decode()


def kernel_call_count(activations: str = "int8") -> int:
    """Calls of the ExecuTorch kernels (``paretoq::linear_8da.out`` for "int8",
    ``paretoq::linear.out`` for "float") since the library was loaded."""
    if activations not in ACTIVATION_OPS:
        raise ValueError(f"activations must be 'float' or 'int8', got {activations!r}")
    from ._build import kernel_library_handle
    return int(kernel_library_handle().paretoq_call_count(1 if activations == "float" else 0))


_LOADED: "weakref.WeakSet" = weakref.WeakSet()  # callables returned by load_executorch, while alive


def set_num_threads(n: int) -> None:
    """Resize ExecuTorch's shared thread pool (used by our kernels and by XNNPACK).

    Call it before ``load_executorch``: an XNNPACK delegate keeps the pool that existed when its
    method was loaded, and resizing frees that pool, so a method loaded earlier would run on freed
    memory. While a program returned by ``load_executorch`` is alive this raises instead (drop the
    program, resize, load it again). Programs loaded directly through ``executorch.runtime`` are
    not tracked: the same rule applies to them."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive integer, got {n!r}")
    alive = len(_LOADED)
    if alive:
        raise RuntimeError(
            f"set_num_threads({n}): {alive} program(s) loaded with load_executorch are still alive; XNNPACK "
            "keeps the thread pool a method was loaded with and resizing frees it, so their next call would use "
            "freed memory. Call set_num_threads before load_executorch, or delete those programs first")
    from ._build import kernel_library_handle
    if not kernel_library_handle().paretoq_set_num_threads(int(n)):
        raise RuntimeError(f"could not resize the ExecuTorch thread pool to {n} threads")


def _check_float32(model: torch.nn.Module) -> None:
    from paretoq_ao.packed import ParetoQPackedTensor
    for name, p in model.named_parameters():
        if isinstance(p, ParetoQPackedTensor) and p.scale.dtype != torch.float32:
            raise TypeError(
                f"export_executorch: {name} has {p.scale.dtype} scales; the ExecuTorch kernels take "
                f"float32 models (convert the model with .float() before quantize_)"
            )


class _PackedLinear(torch.nn.Module):
    """Export-time stand-in for an nn.Linear with a packed weight: plain buffers + the op.

    torch.export handles the tensor-subclass weight for simple graphs, but not together with
    mutated buffers (KV caches) in ``run_decompositions``; plain buffers always work.
    """

    def __init__(self, linear: torch.nn.Linear, activations: Optional[str]):
        super().__init__()
        w = linear.weight
        self.register_buffer("packed", w.qdata)
        self.register_buffer("scale", w.scale)
        self.bits = float(w.bits)
        self.in_features = w.shape[1]
        self.bias = linear.bias
        self.op = torch.ops.paretoq.linear_8da if (activations or w.activations) == "int8" else torch.ops.paretoq.linear

    def forward(self, x):
        out = self.op(x, self.packed, self.scale, self.bits)
        return out + self.bias if self.bias is not None else out


@contextlib.contextmanager
def _plain_packed_linears(model: torch.nn.Module, activations: Optional[str]):
    """Temporarily swap packed linears for ``_PackedLinear`` (restored on exit)."""
    from paretoq_ao.packed import ParetoQPackedTensor
    swapped = []
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and isinstance(child.weight, ParetoQPackedTensor):
                setattr(mod, cname, _PackedLinear(child, activations))
                swapped.append((mod, cname, child))
    try:
        yield model
    finally:
        for mod, cname, child in reversed(swapped):
            setattr(mod, cname, child)


@contextlib.contextmanager
def _quantized_embeddings(model: torch.nn.Module, bits: Optional[int], group_size: int):
    """Temporarily replace nn.Embedding modules by ``QuantizedEmbedding`` (restored on exit)."""
    if bits is None:
        yield model
        return
    from .embedding import quantize_embeddings

    originals = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Embedding}
    quantize_embeddings(model, bits, group_size)
    try:
        yield model
    finally:
        for name, m in originals.items():
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, m)


def export_executorch(model: torch.nn.Module, example_inputs: Sequence[Any], path,
                      dynamic_shapes=None, strict: bool = False, embedding_bits: Optional[int] = None,
                      embedding_group_size: int = 32, activations: Optional[str] = "int8") -> str:
    """Converted model -> torch.export -> XNNPACK for everything else -> ``.pte`` (atomic write).

    Packed ParetoQ linears stay ParetoQ ops, run by the C++ kernels: ``paretoq::linear.out`` (float
    activations) or ``paretoq::linear_8da.out`` (dynamic int8 activations), recorded in the program.
    ``activations``: "int8" (default) or "float" for every packed layer, or None to keep each
    layer's own setting. ``embedding_bits`` (4 or 8) stores every ``nn.Embedding`` group-wise
    quantized in the program, looked up by ExecuTorch's quantized embedding kernels (see
    ``paretoq_ao.export.embedding``); the model itself is not changed. Returns the written path.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    from paretoq_ao.serialization import atomic_write

    if activations is not None and activations not in ACTIVATION_OPS:
        raise ValueError(f"export_executorch: activations must be 'int8', 'float' or None, got {activations!r}")
    _check_float32(model)
    from paretoq_ao.packed import ParetoQPackedTensor
    if isinstance(model, torch.nn.Linear) and isinstance(model.weight, ParetoQPackedTensor):
        model = _PackedLinear(model, activations)  # the model is one packed layer
    model = model.eval()
    with torch.no_grad(), _plain_packed_linears(model, activations), \
            _quantized_embeddings(model, embedding_bits, embedding_group_size):
        ep = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes, strict=strict)
    edge = to_edge_transform_and_lower(
        ep, partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    )
    program = edge.to_executorch()
    data = program.buffer

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)
    return os.fspath(path)


def _ops_used(path) -> Dict[str, bool]:
    """Which separately loaded kernel libraries the program needs (operator names in the file)."""
    found = {b"paretoq::linear": False, b"paretoq::linear_8da": False, b"quantized_decomposed::": False}
    tail = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 22)
            if not block:
                break
            chunk = tail + block
            for k in found:
                found[k] = found[k] or k in chunk
            tail = chunk[-64:]
    return {"paretoq": found[b"paretoq::linear"], "int8": found[b"paretoq::linear_8da"],
            "quantized": found[b"quantized_decomposed::"]}


def program_activations(path) -> str:
    """How the ParetoQ layers of a ``.pte`` treat activations, read from the program's operator
    names: "int8" (``paretoq::linear_8da``), "float" (``paretoq::linear``), "mixed" or "none"."""
    import mmap
    import re

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        modes = {"int8" if m.group(1) else "float" for m in re.finditer(rb"paretoq::linear(_8da)?(?![a-z0-9_])", mm)}
    return "none" if not modes else modes.pop() if len(modes) == 1 else "mixed"


def load_executorch(path, method: str = "forward", load_library: bool = True) -> Callable[..., Any]:
    """Load a ``.pte`` through ``executorch.runtime`` and return a callable for ``method``.

    The kernel library is built/loaded first (``load_library=False`` skips that; a program that
    uses ParetoQ ops then raises ``MissingKernelsError`` naming what to load, instead of the
    runtime's bare error 0x14). The callable takes tensors and returns a tensor (one output) or a
    tuple of tensors.
    """
    from executorch.runtime import Runtime

    path = os.fspath(path)
    if load_library:
        load_kernels()
    runtime = Runtime.get()
    used = _ops_used(path)
    if used["quantized"] and load_library:
        from .embedding import load_quantized_kernels

        load_quantized_kernels()
    if used["paretoq"]:
        registered = set(_OP_NAMES) <= set(runtime.operator_registry.operator_names)
        if not registered:
            raise MissingKernelsError(
                f"{path} uses the ParetoQ operators {' / '.join(_OP_NAMES)}, but the ParetoQ ExecuTorch kernel "
                f"library is not loaded in this process: call paretoq_ao.export.load_kernels() "
                f"(it builds paretoq_ao/export/csrc with CMake into ~/.cache/paretoq_ao and loads "
                f"libparetoq_et_kernels.so) before loading the program"
            )
    program = runtime.load_program(path)
    m = program.load_method(method)
    if m is None:
        raise RuntimeError(f"{path} has no method {method!r} (has {sorted(program.method_names)})")

    def run(*inputs):
        outs = m.execute(list(inputs))
        return outs[0] if len(outs) == 1 else tuple(outs)

    run.method = m  # type: ignore[attr-defined]
    _LOADED.add(run)
    return run
