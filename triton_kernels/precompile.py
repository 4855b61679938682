"""Tune and compile ``triton_linear`` ahead of CUDA-graph capture: ``warmup(*shapes)`` and the
shapes of a model's packed layers (``model_shapes``). The configs land in tuning.py's cache."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from paretoq_ao.formats import get_format
from paretoq_ao.packing import packed_row_bytes

from .linear import triton_linear
from .problem import KernelConfig, _prepare, interpreting
from .tuning import _CACHE, tuning_key

__all__ = ["warmup", "model_shapes"]


def _parse_shape(s) -> Tuple[int, int, int, float, Optional[int]]:
    if isinstance(s, dict):
        return int(s["M"]), int(s["N"]), int(s["K"]), s["bits"], s.get("group_size")
    s = tuple(s)
    if len(s) == 4:
        return int(s[0]), int(s[1]), int(s[2]), s[3], None
    if len(s) == 5:
        return int(s[0]), int(s[1]), int(s[2]), s[3], (None if s[4] is None else int(s[4]))
    raise ValueError(f"warmup: a shape is (M, N, K, bits) or (M, N, K, bits, group_size), got {s!r}")


def warmup(*shapes, dtype=torch.bfloat16, out_dtype=None, device=None,
           scale_dtype=None) -> Dict[tuple, KernelConfig]:
    """Tune and compile ``triton_linear`` for each shape ahead of CUDA-graph capture.

    Each shape is ``(M, N, K, bits)`` or ``(M, N, K, bits, group_size)`` (or a dict with those
    keys); activations use ``dtype``, scales ``scale_dtype`` (default: ``dtype``). Random codes are
    used (timing does not depend on the values). Returns {shape tuple: chosen config}. Configs are
    cached per M *bucket* (1, 2, 4, ..., 64, 128, ..., 1024), so one M per bucket is enough.
    """
    if device is None:
        device = "cpu" if interpreting() else "cuda"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    result = {}
    for s in shapes:
        M, N, K, bits, gs = _parse_shape(s)
        fmt = get_format(bits)
        groups = 1 if gs is None else K // gs
        if gs is not None and K % gs:
            raise ValueError(f"warmup: group_size={gs} does not divide K={K} in shape {s!r}")
        packed = torch.randint(0, 256, (N, packed_row_bytes(K, fmt)), dtype=torch.uint8,
                               device=device)
        scale = torch.rand(N, groups, device=device).add_(0.5).to(scale_dtype or dtype)
        x = torch.randn(M, K, device=device, dtype=dtype)
        triton_linear(x, packed, scale, fmt.bits, out_dtype)
        problem = _prepare(x, packed, scale, fmt.bits, out_dtype)[0]
        result[(M, N, K, fmt.bits, gs)] = None if problem is None else _CACHE.get(tuning_key(problem))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result


def model_shapes(model: torch.nn.Module, batch_sizes=(1,)) -> List[tuple]:
    """(M, N, K, bits, group_size) of every packed ParetoQ linear weight in ``model``, per M."""
    from paretoq_ao.packed import ParetoQPackedTensor

    seen = []
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, ParetoQPackedTensor):
            n, k = w.shape
            for m in batch_sizes:
                t = (int(m), int(n), int(k), w.bits, w.group_size)
                if t not in seen:
                    seen.append(t)
    return seen
