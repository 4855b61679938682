"""Packed low-bit weights: ``quantize_(model, ParetoQWeightOnlyConfig(bits=2))``.

Applied to a QAT model it packs each ``ParetoQQATWeight`` with its learned scale; applied to a
plain model it quantizes post-training (round-to-nearest with the initial scale, or with a
per-row/group scale search) — the RTN baseline. The packed layout is defined in packing.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler
from torchao.utils import TorchAOBaseTensor

from . import _targets
from .formats import get_format
from .ops import eager_call_ok, run_linear
from .ops import linear as paretoq_linear
from .ops import linear_8da as paretoq_linear_8da
from .packing import pack_codes, unpack_codes
from .qat import ParetoQQATWeight, detach_qat_state, validate_config
from .quant import dequantize_codes, init_scale, quantize_codes, search_scale

__all__ = ["ParetoQPackedTensor", "ParetoQWeightOnlyConfig", "ACTIVATIONS", "set_activations"]

aten = torch.ops.aten

# How a packed layer treats its activations: "float" (paretoq::linear, the default: exactly the
# packed model) or "int8" (paretoq::linear_8da: dynamic per-token int8, faster on CPUs).
ACTIVATIONS = ("float", "int8")


def _check_activations(activations) -> str:
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activations!r}")
    return activations


class ParetoQPackedTensor(TorchAOBaseTensor):
    """A [N, K] weight stored as packed ``bits``-bit codes plus scales.

    qdata: uint8 [N, ceil(K * code_bits / 8)] (layout: packing.py)
    scale: [N, 1] or [N, K // group_size], in the original weight dtype (also this tensor's dtype)
    activations: "float" (F.linear runs paretoq::linear) or "int8" (paretoq::linear_8da)
    """

    tensor_data_names = ["qdata", "scale"]
    tensor_attribute_names = ["bits", "shape", "activations"]
    activations = "float"  # objects pickled before the attribute existed

    def __new__(cls, qdata, scale, bits, shape, activations="float"):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=scale.dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bits, shape, activations="float"):
        self.qdata = qdata
        self.scale = scale
        self.bits = get_format(bits).bits
        self.activations = _check_activations(activations)

    @property
    def group_size(self) -> Optional[int]:
        groups = self.scale.shape[1]
        return None if groups == 1 else self.shape[1] // groups

    @classmethod
    def from_float(cls, weight: torch.Tensor, scale: torch.Tensor, bits, activations="float") -> "ParetoQPackedTensor":
        codes = quantize_codes(weight, scale, bits)
        return cls(pack_codes(codes, bits), scale.detach().to(weight.dtype).contiguous(), bits, weight.shape,
                   activations)

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.qdata, self.shape[1], self.bits)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_codes(self.codes(), self.scale, self.bits).to(dtype or self.dtype)

    def nbytes_packed(self) -> int:
        return self.qdata.numel() * self.qdata.element_size() + self.scale.numel() * self.scale.element_size()

    def _stable_hash_for_caching(self) -> str:
        # What a compiled graph depends on: format, shapes, dtypes, device type (not the values).
        return (f"ParetoQPackedTensor:{self.bits}:{tuple(self.shape)}:{tuple(self.qdata.shape)}:"
                f"{tuple(self.scale.shape)}:{self.scale.dtype}:{self.qdata.device.type}:{self.activations}")

    def __repr__(self):
        act = "" if self.activations == "float" else f", activations={self.activations!r}"
        return (f"ParetoQPackedTensor(shape={tuple(self.shape)}, bits={self.bits}, "
                f"group_size={self.group_size}, dtype={self.dtype}{act})")


implements = ParetoQPackedTensor.implements
implements_torch_function = ParetoQPackedTensor.implements_torch_function


@implements(aten.linear.default)
@implements_torch_function(F.linear)
def _(func, types, args, kwargs):
    x = args[0]
    w = args[1] if len(args) > 1 else kwargs["weight"]
    b = args[2] if len(args) > 2 else (kwargs or {}).get("bias")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"linear: input of shape {tuple(x.shape)} does not match the packed weight of shape "
            f"{tuple(w.shape)} (in_features={w.shape[1]})"
        )
    int8 = w.activations == "int8"
    if eager_call_ok(x):  # plain eager inference: the op's body without its wrapper (same result)
        out = run_linear(x, w.qdata, w.scale, float(w.bits), int8)
    else:
        out = (paretoq_linear_8da if int8 else paretoq_linear)(x, w.qdata, w.scale, float(w.bits))
    if b is None:
        return out
    return out + (b if b.dtype == out.dtype else b.to(out.dtype))


def _metadata(t: ParetoQPackedTensor) -> str:
    return f"bits={t.bits}, group_size={t.group_size}, shape={tuple(t.shape)}"


@implements(aten.copy_.default)
def _(func, types, args, kwargs):
    dst, src = args[0], args[1]
    if not isinstance(dst, ParetoQPackedTensor):
        raise ValueError(
            f"cannot copy a packed ParetoQ weight ({_metadata(src)}) into a plain "
            f"{tuple(dst.shape)} tensor: convert the model first with "
            f"ParetoQWeightOnlyConfig(bits={src.bits}, group_size={src.group_size})"
        )
    if not isinstance(src, ParetoQPackedTensor):
        raise ValueError(
            f"cannot copy a plain {tuple(src.shape)} tensor into a packed ParetoQ weight "
            f"({_metadata(dst)}); load a checkpoint saved from a converted model"
        )
    if (dst.bits, dst.group_size, tuple(dst.shape)) != (src.bits, src.group_size, tuple(src.shape)):
        raise ValueError(
            f"packed weight mismatch: the checkpoint has {_metadata(src)}, the model has {_metadata(dst)}"
        )
    dst.qdata.copy_(src.qdata)
    dst.scale.copy_(src.scale)
    return dst


def _check_loaded_packed(module, state_dict, prefix, *args):
    """load_state_dict pre-hook of converted layers: a ValueError naming what differs."""
    src = state_dict.get(prefix + "weight")
    dst = module._parameters.get("weight")
    if src is None or not isinstance(dst, ParetoQPackedTensor):
        return
    where = f"checkpoint layer {prefix[:-1]!r}"
    if not isinstance(src, ParetoQPackedTensor):
        raise ValueError(
            f"{where} holds a plain {tuple(src.shape)} weight but the model's layer is packed "
            f"({_metadata(dst)}); load a checkpoint saved from a converted model"
        )
    if (dst.bits, dst.group_size, tuple(dst.shape)) != (src.bits, src.group_size, tuple(src.shape)):
        raise ValueError(f"{where} was saved with {_metadata(src)} but the model has {_metadata(dst)}")


@dataclass
class ParetoQWeightOnlyConfig(AOBaseConfig):
    """Pack each selected linear weight at its true bit width.

    Args:
        bits: 1, 1.58 (ternary), 2, 3 or 4. On a QAT model it must equal the QAT bits.
        group_size: None (one scale per row) or the group size; on a QAT model it must equal the
            QAT group size.
        scale_search: post-training only: search each row/group scale on a grid of 0.1x..1.5x the
            initial scale for the least squared weight error (False: the paper's initial scale).
        activations: "float" (default: the layer computes exactly x @ dequantized W) or "int8"
            (dynamic per-token int8 activations, paretoq::linear_8da: faster on CPUs, slightly less
            accurate); ``set_activations`` changes it later.
    """

    bits: float = 2
    group_size: Optional[int] = None
    scale_search: bool = False
    activations: str = "float"

    def __post_init__(self):
        validate_config(self)
        _check_activations(self.activations)


def _convert_problems(config):
    def problems(module):
        errs = _targets.common_problems(module, config.group_size)
        if errs:
            return errs
        w = module.weight
        if isinstance(w, ParetoQPackedTensor):
            return [f"already converted to packed {w.bits}-bit weights (group_size={w.group_size})"]
        if isinstance(w, ParetoQQATWeight):
            if (w.bits, w.group_size) != (config.bits, config.group_size):
                return [f"was trained with ParetoQ QAT bits={w.bits}, group_size={w.group_size} but the "
                        f"config asks for bits={config.bits}, group_size={config.group_size}"]
            return _targets.nonfinite_problem(w) + _targets.nonfinite_problem(w.scale)
        return _targets.nonfinite_problem(w)

    return problems


@register_quantize_module_handler(ParetoQWeightOnlyConfig)
def _weight_only_transform(module: nn.Module, config: ParetoQWeightOnlyConfig) -> nn.Module:
    def apply(mod, fqn, memo):
        old = mod.weight
        if id(old) not in memo:
            if isinstance(old, ParetoQQATWeight):
                latent, scale = old.detach(), old.scale.detach()
            else:
                latent = old.detach()
                pick = search_scale if config.scale_search else init_scale
                scale = pick(latent, config.bits, config.group_size)
            packed = ParetoQPackedTensor.from_float(latent, scale, config.bits, config.activations)
            memo[id(old)] = nn.Parameter(packed, requires_grad=False)
        detach_qat_state(mod)
        mod.weight = memo[id(old)]
        mod._paretoq_load_hook = mod._register_load_state_dict_pre_hook(_check_loaded_packed, with_module=True)

    return _targets.run(module, config, _convert_problems(config), apply)


def set_activations(model: nn.Module, activations: str) -> int:
    """Set how every packed layer of ``model`` treats its activations ("float" or "int8", see
    ``ParetoQWeightOnlyConfig``); returns the number of packed weights changed. Call it before
    ``torch.compile`` / export (a compiled graph keeps the op it traced)."""
    _check_activations(activations)
    n = 0
    for p in model.parameters():
        if isinstance(p, ParetoQPackedTensor) and p.activations != activations:
            p.activations = activations
            n += 1
    return n


torch.serialization.add_safe_globals([ParetoQPackedTensor])
