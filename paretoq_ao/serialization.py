"""Saving packed models: safetensors (flattened packed tensors + JSON metadata) and atomic writes.

In a ``.safetensors`` file a packed weight ``<name>`` is stored as two plain tensors,
``<name>.qdata`` (uint8, the packing.py layout) and ``<name>.scale``, and described in the header
metadata entry ``paretoq_ao`` (JSON: {name: {"bits": ..., "shape": [N, K]}}, plus ``"activations": "int8"``
for layers set to int8 activations) together with the
layout name. ``torch.save`` / ``torch.load(weights_only=True)`` work directly on state dicts
holding ``ParetoQPackedTensor`` (the class is on torch's safe-globals list).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Dict, Mapping, Optional, Union

import torch
from torch import nn

from .packed import ParetoQPackedTensor
from .packing import LAYOUT

__all__ = ["atomic_write", "save", "save_safetensors", "load_safetensors"]

_META_KEY = "paretoq_ao"


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then atomically rename onto ``path``; ``path`` is untouched on error."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(obj, path) -> None:
    """``torch.save`` written atomically (the previous file survives a failed or interrupted save)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _state_dict(obj) -> Mapping[str, torch.Tensor]:
    return obj.state_dict() if isinstance(obj, nn.Module) else obj


def save_safetensors(obj: Union[nn.Module, Mapping[str, torch.Tensor]], path, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a model's (or a state dict's) tensors to ``path`` in safetensors format, atomically."""
    from safetensors.torch import save_file

    flat, described, seen = {}, {}, {}
    for name, t in _state_dict(obj).items():
        if isinstance(t, ParetoQPackedTensor):
            described[name] = {"bits": t.bits, "shape": list(t.shape)}
            if t.activations != "float":
                described[name]["activations"] = t.activations
            parts = {f"{name}.qdata": t.qdata, f"{name}.scale": t.scale}
        elif isinstance(t, torch.Tensor):
            parts = {name: t}
        else:
            raise TypeError(f"save_safetensors: entry {name!r} is a {type(t).__name__}, not a tensor")
        for key, tensor in parts.items():
            tensor = tensor.detach()
            # safetensors refuses aliased storage: tied tensors are written as separate copies.
            sid = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            flat[key] = tensor.clone().contiguous() if sid in seen else tensor.contiguous()
            seen[sid] = key
    meta = dict(metadata or {})
    meta.update({"format": "pt", _META_KEY: json.dumps({"layout": LAYOUT, "tensors": described})})
    atomic_write(path, lambda tmp: save_file({k: v.cpu() for k, v in flat.items()}, tmp, metadata=meta))


def load_safetensors(path, device: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    """Read a file written by ``save_safetensors`` back into a state dict with packed tensors."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        flat = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta.get(_META_KEY, '{"tensors": {}}'))
    if info.get("layout", LAYOUT) != LAYOUT:
        raise ValueError(f"{path}: packed layout {info['layout']!r} is not the supported {LAYOUT!r}")
    out = {}
    for name, d in info["tensors"].items():
        try:
            qdata, scale = flat.pop(f"{name}.qdata"), flat.pop(f"{name}.scale")
        except KeyError as e:
            raise ValueError(f"{path}: packed tensor {name!r} is missing its part {e}") from None
        out[name] = ParetoQPackedTensor(qdata, scale, d["bits"], torch.Size(d["shape"]), d.get("activations", "float"))
    out.update(flat)
    return out
