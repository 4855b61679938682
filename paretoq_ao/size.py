"""Model size report: bytes actually stored per layer (packed codes + scales) vs the original."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from .packed import ParetoQPackedTensor
from .qat import ParetoQQATWeight

__all__ = ["LayerSize", "SizeReport", "model_size"]


@dataclass
class LayerSize:
    name: str
    shape: tuple
    bits: Optional[float]  # None: kept in full precision
    group_size: Optional[int]
    weight_bytes: int  # packed codes (or the full-precision tensor)
    scale_bytes: int
    original_bytes: int  # the same weight in its original dtype

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.scale_bytes

    @property
    def bits_per_weight(self) -> float:
        n = 1
        for d in self.shape:
            n *= d
        return 8 * self.total_bytes / max(n, 1)


@dataclass
class SizeReport:
    layers: List[LayerSize] = field(default_factory=list)
    other_bytes: int = 0  # every other parameter and buffer (embeddings, norms, biases, ...)

    @property
    def quantized_bytes(self) -> int:
        return sum(l.total_bytes for l in self.layers if l.bits is not None)

    @property
    def total_bytes(self) -> int:
        return sum(l.total_bytes for l in self.layers) + self.other_bytes

    @property
    def original_bytes(self) -> int:
        return sum(l.original_bytes for l in self.layers) + self.other_bytes

    @property
    def ratio(self) -> float:
        return self.total_bytes / max(self.original_bytes, 1)

    def __str__(self) -> str:
        rows = [f"{'layer':<40} {'shape':>14} {'bits':>5} {'group':>6} {'bytes':>12} {'orig bytes':>12} {'b/w':>6}"]
        for l in self.layers:
            bits = "-" if l.bits is None else str(l.bits)
            rows.append(
                f"{l.name:<40} {'x'.join(map(str, l.shape)):>14} {bits:>5} {str(l.group_size or '-'):>6} "
                f"{l.total_bytes:>12,} {l.original_bytes:>12,} {l.bits_per_weight:>6.2f}"
            )
        rows.append(f"other parameters and buffers: {self.other_bytes:,} bytes")
        rows.append(
            f"total: {self.total_bytes:,} bytes ({self.total_bytes / 2**20:.2f} MiB) vs original "
            f"{self.original_bytes:,} bytes ({self.original_bytes / 2**20:.2f} MiB): {self.ratio:.3f}x"
        )
        return "\n".join(rows)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def model_size(model: nn.Module, original_dtype: Optional[torch.dtype] = None) -> SizeReport:
    """Per-layer and total storage of ``model``; shared tensors are counted once.

    ``original_dtype``: dtype the original weights are counted in (default: each weight's own
    dtype, which for packed weights is the dtype of their scales).
    """
    report = SizeReport()
    seen = set()
    for mod_name, mod in model.named_modules():
        w = mod._parameters.get("weight")
        if w is None or id(w) in seen or not isinstance(mod, nn.Linear):
            continue
        seen.add(id(w))
        numel = w.shape.numel()
        orig = numel * (original_dtype or w.dtype).itemsize
        if isinstance(w, ParetoQPackedTensor):
            seen.add(id(w.scale))
            report.layers.append(LayerSize(mod_name, tuple(w.shape), w.bits, w.group_size,
                                           _nbytes(w.qdata), _nbytes(w.scale), orig))
        elif isinstance(w, ParetoQQATWeight):  # training form: latent + scale, nothing packed yet
            seen.add(id(w.scale))
            report.layers.append(LayerSize(mod_name, tuple(w.shape), None, w.group_size,
                                           _nbytes(w), _nbytes(w.scale), orig))
        else:
            report.layers.append(LayerSize(mod_name, tuple(w.shape), None, None, _nbytes(w), 0, orig))
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            report.other_bytes += _nbytes(t)
    return report
