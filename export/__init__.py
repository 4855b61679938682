"""ExecuTorch export and the C++ low-bit kernel library (installed as ``paretoq_ao.export``).

    from paretoq_ao.export import export_executorch, load_executorch
    export_executorch(converted_model, (example_input,), "model.pte")   # packed linears -> our op
    forward = load_executorch("model.pte")                                # builds/loads kernels once
    out = forward(example_input)

* ``load_kernels()`` builds export/csrc with CMake on first use (cached under
  ``~/.cache/paretoq_ao``) and loads it exactly once; it returns the library path.
* Programs store each packed weight in the blocked16 order of ``paretoq_ao.packing`` by default
  (``weight_order="rows"``: the packed rows as they are); the kernels read either (see
  csrc/paretoq_kernels.h).
* Activations: the program records them per layer, as the op each layer calls:
  ``paretoq::linear`` (float activations, matching the eager model to float rounding) or
  ``paretoq::linear_8da`` (dynamic int8 per token, integer dot products: faster). The default of
  ``export_executorch`` is ``activations="int8"`` (the choice of torchao's 8da4w programs);
  ``activations=None`` keeps each layer's own setting (``ParetoQPackedTensor.activations``).
* float32 only: the kernels take float32 scales and float32 activations. ``to_float32(model)``
  makes a bf16/fp16 converted model exportable (float32 copies of its scales and other floating
  weights; the packed codes are kept); floating example inputs must be float32.
* NaN / Inf: a token (a row of the activations) holding NaN or +-Inf is computed with float
  activations in both modes, so non-finite values propagate as in eager PyTorch (IEEE rules:
  ``inf * 0`` and ``inf - inf`` give NaN, the sign of an Inf follows the weights); the other rows of
  the batch are not affected (tested per bit width and scale layout in tests/test_export.py).
* ``load_executorch`` checks the file before the runtime sees it (a missing file raises
  ``FileNotFoundError``; an empty, foreign or truncated one ``ValueError``, naming the path):
  the runtime aborts the process on some malformed files instead of raising.
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
    "set_num_threads", "reference_linear_int8", "MissingKernelsError", "ACTIVATION_OPS", "to_float32",
    "check_program_file",
]

# The operator a layer calls records its activation mode in the program.
ACTIVATION_OPS = {"float": "paretoq::linear", "int8": "paretoq::linear_8da"}
_OP_NAMES = tuple(f"{op}{order}.out" for op in ACTIVATION_OPS.values() for order in ("", "_b16"))


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
                f"float32 scales: call paretoq_ao.export.to_float32(model) first (float32 copies of the "
                f"scales, the packed codes are kept)"
            )


def _check_not_qat(model: torch.nn.Module) -> None:
    """A QAT layer (latent weight + learnable scale, ``weight_qat_format`` buffer) cannot be exported."""
    for name, mod in model.named_modules():
        fmt = mod._buffers.get("weight_qat_format")
        if fmt is not None:
            bits100, gs = (int(v) for v in fmt.tolist())
            bits = bits100 / 100
            bits = int(bits) if bits.is_integer() else bits
            raise ValueError(
                f"export_executorch: layer {name or type(mod).__name__!r} still holds ParetoQ QAT weights "
                f"(bits={bits}, group_size={gs or None}); convert the model to packed weights first: "
                f"paretoq_ao.quantize(model, ParetoQWeightOnlyConfig(bits={bits}, group_size={gs or None})), or "
                f"`paretoq convert <qat dir> <out>` for a saved checkpoint")


def _check_example_inputs(example_inputs) -> None:
    """Floating example inputs must be float32: the program keeps their dtype, the kernels take float32."""
    from torch.utils._pytree import tree_leaves

    if isinstance(example_inputs, torch.Tensor):
        raise TypeError("export_executorch: example_inputs must be a tuple of inputs, got a single tensor "
                        "(pass (x,))")
    for i, x in enumerate(example_inputs):
        for leaf in tree_leaves(x):
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.dtype != torch.float32:
                raise TypeError(
                    f"export_executorch: example input {i} is {leaf.dtype}; the program would keep that dtype "
                    f"and the ExecuTorch kernels take float32 activations (it could never run): pass it as "
                    f"float32 (x.float())")


def to_float32(model: torch.nn.Module) -> Dict[str, torch.dtype]:
    """Make a converted model exportable in place: every packed weight whose scales are not float32
    (a model converted or saved in bf16/fp16) gets float32 copies of its scales, its packed codes
    kept as they are; every other floating parameter and buffer that is not float32 becomes
    float32. Tied / shared tensors stay shared. Returns ``{name: original dtype}`` of what changed
    (empty when the model was already float32). Upcasting is exact: the model computes the same
    function, in float32."""
    from paretoq_ao.packed import ParetoQPackedTensor

    changed: Dict[str, torch.dtype] = {}
    memo: Dict[int, torch.Tensor] = {}
    for mname, mod in model.named_modules():
        for table in (mod._parameters, mod._buffers):
            for key, t in list(table.items()):
                if t is None:
                    continue
                full = f"{mname}.{key}" if mname else key
                if id(t) in memo:
                    table[key] = memo[id(t)]
                    continue
                if isinstance(t, ParetoQPackedTensor):
                    if t.scale.dtype == torch.float32:
                        continue
                    changed[full] = t.scale.dtype
                    new = ParetoQPackedTensor(t.qdata, t.scale.detach().float().contiguous(), t.bits, t.shape,
                                              t.activations)
                    new = torch.nn.Parameter(new, requires_grad=False) if isinstance(t, torch.nn.Parameter) else new
                elif type(t) in (torch.Tensor, torch.nn.Parameter) and t.is_floating_point() \
                        and t.dtype != torch.float32:
                    changed[full] = t.dtype
                    new = t.detach().float()
                    if isinstance(t, torch.nn.Parameter):
                        new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
                else:
                    continue
                memo[id(t)] = new
                table[key] = new
    return changed


class _PackedLinear(torch.nn.Module):
    """Export-time stand-in for an nn.Linear with a packed weight: plain buffers + the op.

    torch.export handles the tensor-subclass weight for simple graphs, but not together with
    mutated buffers (KV caches) in ``run_decompositions``; plain buffers always work. With
    ``order="blocked16"`` the buffers hold the weight regrouped by ``packing.block16`` and the layer
    calls the ``_b16`` op (the program stores that order; the model's own weight is not changed).
    """

    def __init__(self, linear: torch.nn.Linear, activations: Optional[str], order: str = "blocked16"):
        super().__init__()
        from paretoq_ao.packing import block16
        w = linear.weight
        int8 = (activations or w.activations) == "int8"
        self.bits = float(w.bits)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.bias = linear.bias
        if order == "blocked16":
            codes, scales = block16(w.qdata, w.scale, w.bits, w.shape[1])
            self.register_buffer("packed", codes)
            self.register_buffer("scale", scales)
            self.op = torch.ops.paretoq.linear_8da_b16 if int8 else torch.ops.paretoq.linear_b16
        else:
            self.register_buffer("packed", w.qdata)
            self.register_buffer("scale", w.scale)
            self.op = torch.ops.paretoq.linear_8da if int8 else torch.ops.paretoq.linear
        self.order = order

    def forward(self, x):
        if self.order == "blocked16":
            out = self.op(x, self.packed, self.scale, self.bits, self.out_features)
        else:
            out = self.op(x, self.packed, self.scale, self.bits)
        return out + self.bias if self.bias is not None else out


@contextlib.contextmanager
def _plain_packed_linears(model: torch.nn.Module, activations: Optional[str], order: str):
    """Temporarily swap packed linears for ``_PackedLinear`` (restored on exit)."""
    from paretoq_ao.packed import ParetoQPackedTensor
    swapped = []
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and isinstance(child.weight, ParetoQPackedTensor):
                setattr(mod, cname, _PackedLinear(child, activations, order))
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
                      embedding_group_size: int = 32, activations: Optional[str] = "int8",
                      weight_order: str = "blocked16") -> str:
    """Converted model -> torch.export -> XNNPACK for everything else -> ``.pte`` (atomic write).

    Packed ParetoQ linears stay ParetoQ ops, run by the C++ kernels: ``paretoq::linear.out`` (float
    activations) or ``paretoq::linear_8da.out`` (dynamic int8 activations), recorded in the program.
    ``activations``: "int8" (default) or "float" for every packed layer, or None to keep each
    layer's own setting. ``embedding_bits`` (4 or 8) stores every ``nn.Embedding`` group-wise
    quantized in the program, looked up by ExecuTorch's quantized embedding kernels (see
    ``paretoq_ao.export.embedding``); the model itself is not changed. ``weight_order``:
    "blocked16" (default: the program stores each packed weight regrouped by ``packing.block16``,
    the same bytes plus row padding to whole 16-row blocks, and calls ``paretoq::linear_b16`` /
    ``linear_8da_b16``; decode streams each block as one sequential read, 1.2-1.3x faster) or
    "rows" (the packed rows as they are, ``paretoq::linear`` / ``linear_8da``). Returns the written
    path.

    Refused before anything is exported or written (one-line errors naming the layer / input):
    packed scales that are not float32 (``TypeError``; see ``to_float32``), floating example
    inputs that are not float32 (``TypeError`` naming the input's index and dtype: the program
    would keep that dtype and never run), layers still holding QAT weights (``ValueError``).
    Tokens holding NaN/Inf propagate them as eager PyTorch does (module doc).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    from paretoq_ao.serialization import atomic_write

    if weight_order not in ("blocked16", "rows"):
        raise ValueError(f"export_executorch: weight_order must be 'blocked16' or 'rows', got {weight_order!r}")
    if activations is not None and activations not in ACTIVATION_OPS:
        raise ValueError(f"export_executorch: activations must be 'int8', 'float' or None, got {activations!r}")
    _check_example_inputs(example_inputs)
    _check_not_qat(model)
    _check_float32(model)
    from paretoq_ao.packed import ParetoQPackedTensor
    if isinstance(model, torch.nn.Linear) and isinstance(model.weight, ParetoQPackedTensor):
        model = _PackedLinear(model, activations, weight_order)  # the model is one packed layer
    model = model.eval()
    with torch.no_grad(), _plain_packed_linears(model, activations, weight_order), \
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


# The layout of a .pte (executorch/exir/_serialize/_program.py): a flatbuffer whose bytes 0..4
# are the root table offset (little endian) and 4..8 the file identifier, "ET" + two letters or
# digits (the schema version, "ET12" today); optionally followed at byte 8 by the extended header
# "eh00", uint32 header length, uint64 program size, uint64 segment base offset and (header length
# > 24) uint64 segment data size.
_PTE_MIN_HEAD = 8
_EH_MAGIC = b"eh00"
_EH_MIN_LENGTH = 24


def check_program_file(path, caller: str = "load_executorch") -> int:
    """Check cheaply that ``path`` looks like a whole ExecuTorch program before the runtime reads it
    (the runtime aborts the process on some malformed files instead of raising). Returns its size.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (naming the path) for a
    folder, an empty or too short file, a file identifier other than "ET" + 2 characters (not a
    .pte), or a file shorter than its extended header says (truncated). Damage the header cannot
    show is left to the runtime's own verification (``load_executorch`` reports it as ValueError)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{caller}: no such file {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{caller}: {path!r} is a folder, not a .pte file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if size == 0:
        raise ValueError(f"{caller}: {path!r} is empty (0 bytes), not an ExecuTorch program")
    if size < _PTE_MIN_HEAD:
        raise ValueError(f"{caller}: {path!r} has {size} bytes, too short for an ExecuTorch program")
    ident = head[4:8]
    if not (ident[:2] == b"ET" and all(chr(c).isascii() and chr(c).isalnum() for c in ident[2:4])):
        raise ValueError(f"{caller}: {path!r} is not an ExecuTorch program (file identifier {ident!r} at "
                         f"bytes 4..8; a .pte has 'ET' + its schema version, e.g. b'ET12')")
    root = int.from_bytes(head[0:4], "little")
    if root >= size:
        raise ValueError(f"{caller}: {path!r} is truncated or corrupt: its root table offset {root} lies "
                         f"beyond its {size} bytes")
    if head[8:12] == _EH_MAGIC:
        if size < 8 + _EH_MIN_LENGTH + 8:
            raise ValueError(f"{caller}: {path!r} is truncated: {size} bytes end inside its extended header")
        length = int.from_bytes(head[12:16], "little")
        if length < _EH_MIN_LENGTH:
            raise ValueError(f"{caller}: {path!r} is corrupt: extended header length {length} < "
                             f"{_EH_MIN_LENGTH}")
        program_size = int.from_bytes(head[16:24], "little")
        segment_base = int.from_bytes(head[24:32], "little")
        segment_size = int.from_bytes(head[32:40], "little") if length > _EH_MIN_LENGTH else 0
        need = max(program_size, segment_base + segment_size if segment_base else 0)
        if size < need:
            raise ValueError(f"{caller}: {path!r} is truncated: its header says {need} bytes "
                             f"(program {program_size}, segments from {segment_base}, {segment_size} bytes), "
                             f"the file has {size}")
    return size


def _ops_used(path) -> Dict[str, bool]:
    """Which separately loaded kernel libraries the program needs (operator names in the file)."""
    found = {b"paretoq::linear": False, b"paretoq::linear_8da": False, b"quantized_decomposed::": False,
             b"llama::": False}
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
            "quantized": found[b"quantized_decomposed::"], "llama": found[b"llama::"]}


def program_activations(path) -> str:
    """How the ParetoQ layers of a ``.pte`` treat activations, read from the program's operator
    names: "int8" (``paretoq::linear_8da``), "float" (``paretoq::linear``), "mixed" or "none"."""
    import mmap
    import re

    check_program_file(path, "program_activations")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        modes = {"int8" if m.group(1) else "float"
                 for m in re.finditer(rb"paretoq::linear(_8da)?(?:_b16)?(?![a-z0-9_])", mm)}
    return "none" if not modes else modes.pop() if len(modes) == 1 else "mixed"


def load_executorch(path, method: str = "forward", load_library: bool = True) -> Callable[..., Any]:
    """Load a ``.pte`` through ``executorch.runtime`` and return a callable for ``method``.

    The kernel library is built/loaded first (``load_library=False`` skips that; a program that
    uses ParetoQ ops then raises ``MissingKernelsError`` naming what to load, instead of the
    runtime's bare error 0x14). The callable takes tensors and returns a tensor (one output) or a
    tuple of tensors.

    The file is checked first (``check_program_file``): a missing file raises
    ``FileNotFoundError``, an empty, foreign (random bytes) or truncated one ``ValueError`` naming
    the path, as does a file the runtime's verification then rejects; the runtime itself would
    abort the process on some of these.
    """
    from executorch.runtime import Runtime

    path = os.fspath(path)
    check_program_file(path)
    if load_library:
        load_kernels()
    runtime = Runtime.get()
    used = _ops_used(path)
    if used["quantized"] and load_library:
        from .embedding import load_quantized_kernels

        load_quantized_kernels()
    if used["llama"] and load_library:  # llama::custom_sdpa / update_cache (export/llama.py)
        from ._llm_ops import custom_ops_available

        if not custom_ops_available():
            raise MissingKernelsError(f"{path} uses ExecuTorch's LLM kernels (llama::custom_sdpa / update_cache), "
                                      f"which do not load here (executorch.extension.llm.custom_ops)")
    if used["paretoq"]:
        registered = set(_OP_NAMES) <= set(runtime.operator_registry.operator_names)
        if not registered:
            raise MissingKernelsError(
                f"{path} uses the ParetoQ operators {' / '.join(_OP_NAMES)}, but the ParetoQ ExecuTorch kernel "
                f"library is not loaded in this process: call paretoq_ao.export.load_kernels() "
                f"(it builds paretoq_ao/export/csrc with CMake into ~/.cache/paretoq_ao and loads "
                f"libparetoq_et_kernels.so) before loading the program"
            )
    try:
        program = runtime.load_program(path)
    except RuntimeError as e:  # verification failed (damaged flatbuffer) or the file could not be read
        msg = " ".join(str(e).split())
        raise ValueError(f"load_executorch: {path!r} is not a valid ExecuTorch program (the runtime refused "
                         f"it: {msg}); export it again") from e
    m = program.load_method(method)
    if m is None:
        raise RuntimeError(f"{path} has no method {method!r} (has {sorted(program.method_names)})")

    def run(*inputs):
        outs = m.execute(list(inputs))
        return outs[0] if len(outs) == 1 else tuple(outs)

    run.method = m  # type: ignore[attr-defined]
    _LOADED.add(run)
    return run
