"""Packed low-bit weights: ``quantize_(model, ParetoQWeightOnlyConfig(bits=2))``.

Applied to a QAT model it packs each ``ParetoQQATWeight`` with its learned scale; applied to a
plain model it quantizes post-training (round-to-nearest with the initial scale, or with a
per-row/group scale search) — the RTN baseline. The packed layout is defined in packing.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler
from torchao.utils import TorchAOBaseTensor

from . import _targets, backends
from .formats import get_format
from .ops import eager_call_ok, graph_linear, run_linear, traced_call_ok
from .ops import linear as paretoq_linear
from .ops import linear_8da as paretoq_linear_8da
from .packing import LAYOUT, from_legacy, pack_codes, packed_row_bytes, trits5_problem, unpack_codes
from .qat import ParetoQQATWeight, detach_qat_state, validate_config
from .quant import dequantize_codes, init_scale, quantize_codes, search_scale

__all__ = ["ParetoQPackedTensor", "ParetoQWeightOnlyConfig", "ACTIVATIONS", "SCALE_DTYPES", "set_activations",
           "packed_parts_problem", "check_packed_state_dict"]

aten = torch.ops.aten

# How a packed layer treats its activations: "float" (paretoq::linear, the default: exactly the
# packed model) or "int8" (paretoq::linear_8da: dynamic per-token int8, faster on CPUs).
ACTIVATIONS = ("float", "int8")


def _check_activations(activations) -> str:
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activations!r}")
    return activations


# The dtypes a packed weight's scales (and so the weight itself) may have: every backend of the op
# takes them (float64 runs the PyTorch reference); the codes are uint8 whatever the dtype.
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def packed_parts_problem(qdata, scale, bits, shape) -> Optional[str]:
    """Why ``qdata`` and ``scale`` cannot be the packed parts of a ``bits``-bit weight of ``shape``
    (the layout of packing.py: uint8 [N, ceil(K * code_bits / 8)], scales [N, 1] or [N, K // group_size]
    in one of ``SCALE_DTYPES``, on one device); None when they fit. ``bits`` must be a valid format."""
    fmt = get_format(bits)
    if len(shape) != 2:
        return f"shape {list(shape)} is not [out_features, in_features]"
    n, k = (int(d) for d in shape)
    for part, t in (("qdata", qdata), ("scale", scale)):
        if not isinstance(t, torch.Tensor) or isinstance(t, ParetoQPackedTensor):
            return f"{part} is a {type(t).__name__}, not a plain tensor"
    if qdata.dtype != torch.uint8:
        return f"qdata is {_dtype_name(qdata.dtype)}, not uint8 (the packed codes)"
    want = (n, packed_row_bytes(k, fmt))
    if tuple(qdata.shape) != want:
        return (f"qdata has shape {tuple(qdata.shape)} but a {fmt} weight of shape {(n, k)} is packed as "
                f"{want}")
    if scale.dtype not in SCALE_DTYPES:
        return (f"scale is {_dtype_name(scale.dtype)}, not one of "
                f"{', '.join(_dtype_name(d) for d in SCALE_DTYPES)}")
    if scale.dim() != 2 or scale.shape[0] != n or scale.shape[1] < 1 or k % scale.shape[1]:
        return (f"scale has shape {tuple(scale.shape)} but a weight of shape {(n, k)} needs [{n}, 1] (per row) "
                f"or [{n}, {k} // group_size] (per group)")
    if qdata.device != scale.device:
        return f"qdata is on {qdata.device} but scale on {scale.device}"
    if fmt.storage == "trits5":
        return trits5_problem(qdata)
    return None


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
        self.packing_layout = LAYOUT  # pickled with the object: what torch.load reads back

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
        # What a compiled graph depends on: format, shapes, dtypes, device type (not the values), and
        # the backends its trace may call directly (ops.graph_linear).
        dev = self.qdata.device.type
        return (f"ParetoQPackedTensor:{self.bits}:{tuple(self.shape)}:{tuple(self.qdata.shape)}:"
                f"{tuple(self.scale.shape)}:{self.scale.dtype}:{dev}:{self.activations}:"
                f"{backends.trace_key(dev)}")

    def __repr__(self):
        act = "" if self.activations == "float" else f", activations={self.activations!r}"
        return (f"ParetoQPackedTensor(shape={tuple(self.shape)}, bits={self.bits}, "
                f"group_size={self.group_size}, dtype={self.dtype}{act})")


_base_setstate = ParetoQPackedTensor.__setstate__


def _setstate(self, state):
    # torch.load of an object pickled before the trits5 layout (no "packing_layout" in its state): its
    # ternary codes are in 2-bit fields and are repacked (packing.from_legacy). Assigned after the
    # class because TorchAOBaseTensor.__init_subclass__ sets every subclass's __setstate__.
    state = dict(state)
    if "packing_layout" not in state and get_format(state["bits"]).storage == "trits5":
        state["qdata"] = from_legacy(state["qdata"], self.shape[1], state["bits"])
    state["packing_layout"] = LAYOUT
    _base_setstate(self, state)


ParetoQPackedTensor.__setstate__ = _setstate

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
    elif traced_call_ok(x):  # torch.compile of inference: the backend's own op (no Python per call)
        out = graph_linear(x, w.qdata, w.scale, float(w.bits), int8)
    else:
        out = (paretoq_linear_8da if int8 else paretoq_linear)(x, w.qdata, w.scale, float(w.bits))
    if b is None:
        return out
    return out + (b if b.dtype == out.dtype else b.to(out.dtype))


def _group_size(t: ParetoQPackedTensor):
    try:
        return t.group_size
    except (IndexError, ZeroDivisionError):  # a damaged scale (packed_parts_problem says what is wrong)
        return "?"


def _metadata(t: ParetoQPackedTensor) -> str:
    return f"bits={t.bits}, group_size={_group_size(t)}, shape={tuple(t.shape)}"


def _load_problem(dst: ParetoQPackedTensor, src, check_dtype: bool = True) -> Optional[str]:
    """Why ``src`` (a checkpoint's tensor) cannot be loaded into the packed weight ``dst``, as a
    predicate ("holds ...", "was saved with ..."); None when it can."""
    if not isinstance(src, ParetoQPackedTensor):
        what = (f"a plain {tuple(src.shape)} {_dtype_name(src.dtype)} weight" if isinstance(src, torch.Tensor)
                else f"a {type(src).__name__}")
        return (f"holds {what} but the model's layer is packed ({_metadata(dst)}); load a checkpoint saved "
                f"from a converted model")
    problem = packed_parts_problem(src.qdata, src.scale, src.bits, src.shape)
    if problem is not None:
        return f"holds a damaged packed {src.bits}-bit weight of shape {tuple(src.shape)}: {problem}"
    if (dst.bits, dst.group_size, tuple(dst.shape)) != (src.bits, src.group_size, tuple(src.shape)):
        return f"was saved with {_metadata(src)} but the model has {_metadata(dst)}"
    if check_dtype and src.scale.dtype != dst.scale.dtype:
        theirs, ours = _dtype_name(src.scale.dtype), _dtype_name(dst.scale.dtype)
        return (f"has {theirs} scales but the model's packed layer has {ours} scales; convert the model "
                f"with .to(torch.{theirs}) before loading, or the checkpoint's weight with .to(torch.{ours})")
    return None


@implements(aten.copy_.default)
def _(func, types, args, kwargs):
    dst, src = args[0], args[1]
    if not isinstance(dst, ParetoQPackedTensor):
        raise ValueError(
            f"cannot copy a packed ParetoQ weight ({_metadata(src)}) into a plain "
            f"{tuple(dst.shape)} tensor: convert the model first with "
            f"ParetoQWeightOnlyConfig(bits={src.bits}, group_size={_group_size(src)})"
        )
    # Everything is checked before either part is written: a failed copy leaves dst as it was.
    problem = _load_problem(dst, src)
    if problem is not None:
        raise ValueError(f"cannot copy into a packed ParetoQ weight ({_metadata(dst)}): the source {problem}")
    dst.qdata.copy_(src.qdata)
    dst.scale.copy_(src.scale)
    return dst


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    """``t.to(device / dtype)``, ``.half()``, ``.double()``... (and so ``module.to(...)``): the codes
    move as they are; a dtype converts the scales, which are the weight's dtype."""
    src = args[0]
    kw = dict(kwargs or {})
    dtype = kw.get("dtype") or src.dtype
    device = kw.get("device") or src.device
    if dtype != src.dtype and dtype not in SCALE_DTYPES:
        raise TypeError(
            f"cannot convert a packed ParetoQ weight ({_metadata(src)}) to {dtype}: its scales may be "
            f"{', '.join(_dtype_name(d) for d in SCALE_DTYPES)} (its codes stay uint8)"
        )
    non_blocking = bool(kw.get("non_blocking", False))
    # copy=True: the result never shares storage with ``src`` (a later copy_ into one would change both).
    qdata = src.qdata.to(device=device, non_blocking=non_blocking, copy=True)
    scale = src.scale.to(device=device, dtype=dtype, non_blocking=non_blocking, copy=True)
    out = ParetoQPackedTensor(qdata, scale, src.bits, src.shape, src.activations)
    return return_and_correct_aliasing(func, args, kwargs, out)


def _state_dict_problem(dst: ParetoQPackedTensor, state_dict: Mapping, key: str, assign: bool) -> Optional[str]:
    src = state_dict.get(key)
    if src is None:
        parts = [k for k in (f"{key}.qdata", f"{key}.scale") if k in state_dict]
        if parts:
            return (f"checkpoint key {key!r} is missing but {', '.join(map(repr, parts))} are there: the file was "
                    f"read as plain tensors; read it with paretoq_ao.load_safetensors")
        return None  # load_state_dict reports the missing key
    # assign=True keeps the checkpoint's tensors, dtype included (as for plain parameters).
    problem = _load_problem(dst, src, check_dtype=not assign)
    return None if problem is None else f"checkpoint key {key!r} {problem}"


def _check_loaded_packed(module, state_dict, prefix, local_metadata=None, *args):
    """load_state_dict pre-hook of converted layers: a ValueError naming the key and what differs
    (format, shape, dtype, damaged parts), raised before this layer changes."""
    dst = module._parameters.get("weight")
    if not isinstance(dst, ParetoQPackedTensor):
        return
    assign = bool((local_metadata or {}).get("assign_to_params_buffers", False))
    problem = _state_dict_problem(dst, state_dict, prefix + "weight", assign)
    if problem is not None:
        raise ValueError(problem)


def check_packed_state_dict(model: nn.Module, state_dict: Mapping, assign: bool = False) -> None:
    """Check every packed weight of ``state_dict`` against ``model`` before loading it: a ValueError
    naming the first key whose format, shape, dtype or packed parts do not fit. ``load_state_dict``
    checks each layer as it reaches it (earlier layers are loaded by then); call this first for an
    all-or-nothing load."""
    for name, p in model.named_parameters(remove_duplicate=False):
        if isinstance(p, ParetoQPackedTensor):
            problem = _state_dict_problem(p, state_dict, name, assign)
        elif isinstance(state_dict.get(name), ParetoQPackedTensor):
            src = state_dict[name]
            problem = (f"checkpoint key {name!r} holds a packed weight ({_metadata(src)}) but the model's "
                       f"{tuple(p.shape)} weight is not converted: convert the model first with "
                       f"ParetoQWeightOnlyConfig(bits={src.bits}, group_size={_group_size(src)})")
        else:
            problem = None
        if problem is not None:
            raise ValueError(problem)


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


def _weight_only_apply(config):
    def apply(mod, fqn, memo):
        old = mod.weight
        if id(old) not in memo:
            if old.is_meta:
                # A model built on the meta device has no values to quantize: the layer gets a
                # packed weight of the right format holding meta qdata / scale, which
                # ``load_state_dict(packed_state_dict, assign=True)`` replaces with real ones.
                from .packing import packed_row_bytes

                (n, k), gs = old.shape, config.group_size
                qdata = torch.empty(n, packed_row_bytes(k, config.bits), dtype=torch.uint8,
                                    device=old.device)
                scale = torch.empty(n, 1 if gs is None else k // gs, dtype=old.dtype, device=old.device)
                packed = ParetoQPackedTensor(qdata, scale, config.bits, old.shape, config.activations)
            else:
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

    return apply


_targets.register_scheme(ParetoQWeightOnlyConfig, _convert_problems, _weight_only_apply)


@register_quantize_module_handler(ParetoQWeightOnlyConfig)
def _weight_only_transform(module: nn.Module, config: ParetoQWeightOnlyConfig) -> nn.Module:
    return _targets.run(module, config)


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
