"""Quantization-aware training: ``quantize_(model, ParetoQQATConfig(bits=2))``.

Design (chosen because it trains identically in eager and under ``torch.compile(fullgraph=True)``
and leaves optimizers, gradient clipping and FSDP with ordinary parameters):

* ``module.weight`` becomes a ``ParetoQQATWeight``: an ``nn.Parameter`` subclass that *is* the
  latent full-precision weight (it owns the storage; its gradient is a plain tensor);
* its learnable scale is an ordinary ``nn.Parameter`` registered on the same module as
  ``weight_scale`` ([out, 1] or [out, in // group_size]) and referenced by the weight;
* ``F.linear(x, weight)`` is intercepted by ``__torch_function__`` and computes
  ``F.linear(x, fake_quantize(weight, weight_scale, bits))``; every other op sees a plain tensor.

``state_dict()`` holds plain tensors: ``weight`` (latent), ``weight_scale`` and the int64 buffer
``weight_qat_format`` = [round(100 * bits), group_size or 0], checked when a checkpoint is loaded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch._C import DisableTorchFunctionSubclass
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler
from torchao.utils import TorchAOBaseTensor

from . import _targets
from .formats import get_format
from .quant import _FakeQuantize, check_group_size, init_scale

__all__ = ["ParetoQQATConfig", "ParetoQQATWeight", "qat_format_code"]


def validate_config(config) -> None:
    """Normalise ``config.bits`` and check ``group_size`` (shared by the ParetoQ configs)."""
    config.bits = get_format(config.bits).bits
    check_group_size(config.group_size)


@dataclass
class ParetoQQATConfig(AOBaseConfig):
    """Replace each selected linear weight by a ParetoQ QAT weight with a learnable scale.

    Args:
        bits: 1, 1.58 (ternary), 2, 3 or 4.
        group_size: None for one scale per output row, else one scale per ``group_size``
            consecutive input columns (must divide every selected layer's in_features).

    With torchao's default ``filter_fn`` every ``nn.Linear`` except the output head
    (``lm_head``/``output``, a model's ``get_output_embeddings()``, or a Linear tied to an
    embedding) is converted; pass ``filter_fn`` to choose layers yourself (only nn.Linear layers:
    any other module it selects is refused by name, before any layer changes).

    On a model built on the meta device (``with torch.device("meta")``) the weights and scales
    become meta placeholders of the right shape; fill them with
    ``model.load_state_dict(qat_state_dict, assign=True)``. ``ParetoQWeightOnlyConfig`` does the same
    with packed placeholders, for ``load_state_dict(load_safetensors(path), assign=True)``.
    """

    bits: float = 2
    group_size: Optional[int] = None

    def __post_init__(self):
        validate_config(self)


def qat_format_code(bits, group_size: Optional[int]) -> torch.Tensor:
    return torch.tensor([round(100 * float(get_format(bits).bits)), group_size or 0], dtype=torch.int64)


def _describe_format(code) -> str:
    bits100, gs = (int(v) for v in code)
    b = bits100 / 100
    b = int(b) if b.is_integer() else b
    return f"bits={b}, group_size={gs or None}"


class ParetoQQATWeight(nn.Parameter):
    """Latent full-precision weight whose ``F.linear`` fake-quantizes with ``scale`` (see module doc)."""

    def __new__(cls, data: torch.Tensor, scale: nn.Parameter, bits, group_size=None, requires_grad=True):
        t = torch.Tensor._make_subclass(cls, data.detach(), requires_grad)
        t.scale = scale
        t.bits = get_format(bits).bits
        t.group_size = group_size
        return t

    def __init__(self, *args, **kwargs):
        pass

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0]
            w = args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            with DisableTorchFunctionSubclass():
                wq = _FakeQuantize.apply(w, w.scale, w.bits)
                return F.linear(x, wq.to(x.dtype), b)
        with DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    def fake_quantized(self) -> torch.Tensor:
        """The weight as the forward pass sees it (quantize-dequantize), detached."""
        with torch.no_grad(), DisableTorchFunctionSubclass():
            return _FakeQuantize.apply(self, self.scale, self.bits)

    def __repr__(self):
        return (f"ParetoQQATWeight(shape={tuple(self.shape)}, dtype={self.dtype}, bits={self.bits}, "
                f"group_size={self.group_size})")

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        scale = copy.deepcopy(self.scale, memo)
        result = type(self)(self.detach().clone(), scale, self.bits, self.group_size, self.requires_grad)
        memo[id(self)] = result
        return result

    def __reduce_ex__(self, proto):
        with DisableTorchFunctionSubclass():
            data = self.detach()
        return (_rebuild_qat_weight, (data, self.scale, self.bits, self.group_size, self.requires_grad))


def _rebuild_qat_weight(data, scale, bits, group_size, requires_grad):
    return ParetoQQATWeight(data, scale, bits, group_size, requires_grad)


def _check_loaded_format(module, state_dict, prefix, local_metadata=None, *args):
    """load_state_dict pre-hook of QAT layers: refuse a checkpoint of another format; with
    ``assign=True`` make the loaded weight a ``ParetoQQATWeight`` on the loaded scale (assign would
    otherwise put a plain weight and an unrelated scale in the layer)."""
    key = prefix + "weight_qat_format"
    own = module._buffers.get("weight_qat_format")
    w = module._parameters.get("weight")
    if own is None:
        return
    if not isinstance(w, ParetoQQATWeight) and any(fn is _qat_guard for fn in module._forward_pre_hooks.values()):
        raise ValueError(
            f"cannot load checkpoint layer {prefix[:-1]!r}: the model's QAT layer holds a plain "
            f"{type(w).__name__} weight, something replaced its ParetoQQATWeight (Module.to_empty() of a "
            "meta-device model does: load into the meta-device model with load_state_dict(..., assign=True) instead)")
    if own.is_meta and isinstance(w, ParetoQQATWeight):  # a meta-device model: no values yet
        own = qat_format_code(w.bits, w.group_size)
    if key in state_dict and not own.is_meta and not torch.equal(state_dict[key].to(own.device, own.dtype), own):
        theirs = state_dict[key]
        raise ValueError(
            f"checkpoint layer {prefix[:-1]!r} was saved with ParetoQ QAT {_describe_format(theirs)} "
            f"but the model has {_describe_format(own)}"
        )
    scale_key = prefix + "weight_scale"
    if scale_key in state_dict and state_dict[scale_key].shape != module.weight_scale.shape:
        raise ValueError(
            f"checkpoint layer {prefix[:-1]!r}: weight_scale has shape "
            f"{tuple(state_dict[scale_key].shape)}, the model expects {tuple(module.weight_scale.shape)}"
        )
    if (local_metadata or {}).get("assign_to_params_buffers") and isinstance(w, ParetoQQATWeight) \
            and prefix + "weight" in state_dict:
        # (state_dict is load_state_dict's own copy: rewriting its entries does not touch the caller's)
        scale = module.weight_scale
        if scale_key not in state_dict and scale.is_meta:
            raise ValueError(
                f"checkpoint layer {prefix[:-1]!r} has a weight but no weight_scale, and the model's is on the meta "
                "device: a float checkpoint is loaded before ParetoQQATConfig is applied, not after")
        if scale_key in state_dict:
            scale = nn.Parameter(state_dict[scale_key].detach(), requires_grad=scale.requires_grad)
            state_dict[scale_key] = scale
        state_dict[prefix + "weight"] = ParetoQQATWeight(state_dict[prefix + "weight"], scale, w.bits, w.group_size,
                                                         w.requires_grad)


def _qat_guard(module, args):
    """Forward pre-hook of a QAT layer: its weight must still be the ParetoQQATWeight (a wrapper that
    swaps parameters, such as FSDP2's ``fully_shard``, would otherwise train it unquantized)."""
    if not isinstance(module.weight, ParetoQQATWeight):
        raise RuntimeError(
            f"a ParetoQ QAT layer ({type(module).__name__}, weight {tuple(module.weight.shape)}) found a plain "
            f"{type(module.weight).__name__} weight: something replaced its ParetoQQATWeight (FSDP's fully_shard "
            "does). Call paretoq_ao.distributed.prepare_for_fsdp(model) before fully_shard, or use "
            "paretoq_ao.distributed.shard_model(model)")


def attach_qat_weight(module: nn.Module, weight: ParetoQQATWeight):
    module.weight = weight
    module.register_parameter("weight_scale", weight.scale)
    module.register_buffer("weight_qat_format", qat_format_code(weight.bits, weight.group_size).to(weight.device))
    module._paretoq_load_hook = module._register_load_state_dict_pre_hook(_check_loaded_format, with_module=True)
    module.register_forward_pre_hook(_qat_guard)


def remove_qat_guard(module: nn.Module) -> None:
    # by identity, not by handle: a deep-copied module's handle would point at the original's hooks
    for key, fn in list(module._forward_pre_hooks.items()):
        if fn is _qat_guard:
            del module._forward_pre_hooks[key]


def detach_qat_state(module: nn.Module):
    """Remove what ``attach_qat_weight`` registered (used when converting to packed weights)."""
    module._parameters.pop("weight_scale", None)
    module._buffers.pop("weight_qat_format", None)
    hook = module.__dict__.pop("_paretoq_load_hook", None)
    if hook is not None:
        hook.remove()
    remove_qat_guard(module)


def _qat_problems(config):
    def problems(module):
        errs = _targets.common_problems(module, config.group_size)
        if errs:
            return errs
        w = module.weight
        if isinstance(w, ParetoQQATWeight):
            return [f"already has a ParetoQ QAT weight (bits={w.bits}, group_size={w.group_size}); "
                    "ParetoQQATConfig must be applied once"]
        if isinstance(w, TorchAOBaseTensor):  # packed ParetoQ weights, or another method's
            what = f"packed {w.bits}-bit weights" if hasattr(w, "bits") else f"a quantized {type(w).__name__} weight"
            return [f"already holds {what}; QAT needs the full-precision model"]
        return _targets.nonfinite_problem(w)

    return problems


def _qat_apply(config):
    def apply(mod, fqn, memo):
        old = mod.weight
        if id(old) in memo:  # a weight shared by several layers gets one scale
            attach_qat_weight(mod, memo[id(old)])
            return
        latent = old.detach()
        scale = nn.Parameter(init_scale(latent, config.bits, config.group_size), requires_grad=old.requires_grad)
        new = ParetoQQATWeight(latent, scale, config.bits, config.group_size, old.requires_grad)
        memo[id(old)] = new
        attach_qat_weight(mod, new)

    return apply


_targets.register_scheme(ParetoQQATConfig, _qat_problems, _qat_apply)


@register_quantize_module_handler(ParetoQQATConfig)
def _qat_transform(module: nn.Module, config: ParetoQQATConfig) -> nn.Module:
    return _targets.run(module, config)


torch.serialization.add_safe_globals([ParetoQQATWeight, _rebuild_qat_weight])
