"""Quantized token embeddings for ExecuTorch programs, run by ExecuTorch's own kernels.

The embedding table of a small LLM is often as large as all of its block linears together, and
ParetoQ leaves it in full precision. For deployment ``quantize_embeddings(model, bits=4)`` replaces
each ``nn.Embedding`` with a ``QuantizedEmbedding`` that calls ExecuTorch's
``quantized_decomposed::embedding_4bit`` / ``embedding_byte`` operators. Their runtime kernels
ship with the executorch wheel (``libexecutorch_kernels_quantized.so``), and ``load_quantized_kernels()``
loads them into the runtime. The same replacement works for any program, whatever its linears.

Codes and scales (group-wise, symmetric, no zero point; ExecuTorch's layout, not
``paretoq-rowbits-v1``):

* **4 bits**: ParetoQ's 4-bit grid, q in [-8, 7] times one scale per ``group_size`` columns. The
  scale is chosen by the same per-group search as ``ParetoQWeightOnlyConfig(bits=4,
  scale_search=True)``. Stored as uint8 [V, D / 2] with q + 8 in nibbles: column 2j in the high
  nibble and column 2j + 1 in the low one, as ExecuTorch's kernel reads them.
* **8 bits**: q = round(w / s) in [-127, 127] with s = max|w| / 127 per group, stored as int8
  [V, D].
"""

from __future__ import annotations

import ctypes
import os
from typing import List, Optional

import torch
from torch import nn

__all__ = ["QuantizedEmbedding", "quantize_embeddings", "load_quantized_kernels", "EMBEDDING_BITS"]

EMBEDDING_BITS = (4, 8)
_QUANT_LIB = "libexecutorch_kernels_quantized.so"
_quant_lib_handle: Optional[ctypes.CDLL] = None


def _register_aot_ops() -> None:
    # defines quantized_decomposed::embedding_{byte,2bit,4bit}[.dtype][_out] for torch.export
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401


class QuantizedEmbedding(nn.Module):
    """``nn.Embedding`` with group-wise 4- or 8-bit weights (see the module doc for the layout)."""

    def __init__(self, weight: torch.Tensor, bits: int = 4, group_size: int = 32):
        super().__init__()
        if bits not in EMBEDDING_BITS:
            raise ValueError(f"QuantizedEmbedding: bits must be one of {EMBEDDING_BITS}, got {bits!r}")
        if weight.dim() != 2:
            raise ValueError(f"QuantizedEmbedding: weight must be [num_embeddings, dim], got {tuple(weight.shape)}")
        v, d = weight.shape
        if group_size < 1 or d % group_size or (bits == 4 and group_size % 2):
            raise ValueError(f"QuantizedEmbedding: group_size={group_size} must be a positive (for 4 bits: even) "
                             f"divisor of the embedding dim {d} (weight [{v}, {d}])")
        _register_aot_ops()
        w = weight.detach().float()
        self.bits, self.group_size = bits, group_size
        self.num_embeddings, self.embedding_dim = v, d
        if bits == 4:
            from paretoq_ao.quant import quantize_codes, search_scale

            scale = search_scale(w, 4, group_size)  # [V, D / group_size]
            codes = quantize_codes(w, scale, 4)  # uint8 q + 8 in [0, 15]
            packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
        else:
            g = w.reshape(v, d // group_size, group_size)
            scale = (g.abs().amax(dim=-1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
            packed = torch.round(g / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8).reshape(v, d)
        self.register_buffer("weight", packed.contiguous())
        self.register_buffer("scales", scale.float().contiguous())

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        if self.bits == 4:
            return ops.embedding_4bit.dtype(self.weight, self.scales, None, -8, 7, indices, dtype=torch.float32)
        return ops.embedding_byte.dtype(self.weight, self.scales, None, -127, 127, indices, dtype=torch.float32)

    def dequantized(self) -> torch.Tensor:
        """The [V, D] float32 table the program looks up (for tests and error reports)."""
        if self.bits == 4:
            q = torch.stack(((self.weight >> 4), (self.weight & 15)), dim=-1).reshape(self.num_embeddings, -1)
            q = q.float() - 8.0
        else:
            q = self.weight.float()
        s = self.scales.repeat_interleave(self.group_size, dim=1)
        return q * s

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"


def quantize_embeddings(model: nn.Module, bits: int = 4, group_size: int = 32) -> List[str]:
    """Replace every ``nn.Embedding`` of ``model`` (in place) by a ``QuantizedEmbedding``; returns
    the names replaced. Checks every table before changing any. An embedding whose weight is shared
    with another module (a tied output head) is quantized for the lookup only; the head keeps its own
    full-precision (or separately quantized) weight."""
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Embedding]
    problems = []
    for name, m in targets:
        if m.max_norm is not None:
            problems.append(f"{name}: max_norm={m.max_norm} renormalises rows at lookup time; a quantized table "
                            "cannot")
        d = m.embedding_dim
        if d % group_size or (bits == 4 and group_size % 2):
            problems.append(f"{name}: embedding dim {d} (weight {tuple(m.weight.shape)}) is not a multiple of "
                            f"group_size={group_size}")
        if not torch.isfinite(m.weight).all():
            problems.append(f"{name}: weight {tuple(m.weight.shape)} has NaN/Inf")
    if bits not in EMBEDDING_BITS:
        problems.append(f"bits must be one of {EMBEDDING_BITS}, got {bits!r}")
    if problems:
        raise ValueError("quantize_embeddings: cannot quantize:\n  " + "\n  ".join(problems))
    done = []
    for name, m in targets:
        q = QuantizedEmbedding(m.weight, bits, group_size).to(m.weight.device)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, q)
        done.append(name)
    return done


def load_quantized_kernels() -> str:
    """Load ExecuTorch's quantized kernel library (the runtime side of ``quantized_decomposed``
    ops, embeddings included) into this process once; returns its path."""
    global _quant_lib_handle
    import executorch

    roots = [os.path.join(p, "lib") for p in getattr(executorch, "__path__", [])]
    path = next((os.path.join(r, _QUANT_LIB) for r in roots if os.path.isfile(os.path.join(r, _QUANT_LIB))), None)
    if path is None:
        raise FileNotFoundError(f"{_QUANT_LIB} is not in the executorch package ({roots}); this executorch wheel "
                                "has no quantized kernels, so programs with quantized embeddings cannot run")
    if _quant_lib_handle is None:
        from executorch.runtime import Runtime

        Runtime.get()  # the runtime's registry must exist before the library registers into it
        _quant_lib_handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return path
