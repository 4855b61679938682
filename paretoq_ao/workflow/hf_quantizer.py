"""The ``"paretoq"`` quantization method of transformers: ``ParetoQHfConfig`` (the
``quantization_config`` of a saved packed model), ``ParetoQHfQuantizer`` (``from_pretrained`` of
such a folder, ``save_pretrained`` / ``push_to_hub`` of a packed model) and the tables of which
layers hold packed or QAT weights. Registered with transformers' public registry when imported
(``paretoq_ao.hf`` imports it); the design is described in ``paretoq_ao.hf``."""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..formats import get_format
from ..packed import ParetoQPackedTensor, _check_loaded_packed
from ..packing import LAYOUT, LEGACY_LAYOUTS, from_legacy, legacy_row_bytes, packed_row_bytes
from ..qat import ParetoQQATWeight
from ..serialization import described_tensors, flatten_packed

from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "paretoq"


# --------------------------------------------------------------------------- formats of layers

def _fmt(bits, group_size) -> Dict[str, object]:
    return {"bits": get_format(bits).bits, "group_size": group_size}


def packed_modules(model: nn.Module) -> Dict[str, Dict[str, object]]:
    """{module name: {"bits", "group_size"}} of every layer holding a ``ParetoQPackedTensor`` weight."""
    return {name: _fmt(m.weight.bits, m.weight.group_size) for name, m in model.named_modules()
            if isinstance(m._parameters.get("weight"), ParetoQPackedTensor)}


def qat_modules(model: nn.Module) -> Dict[str, Dict[str, object]]:
    """{module name: {"bits", "group_size"}} of every QAT layer: one holding a ``ParetoQQATWeight``,
    or a ``ParetoQQATLinear`` (the form ``paretoq_ao.distributed`` gives QAT layers for FSDP)."""
    from .distributed import ParetoQQATLinear

    out = {}
    for name, m in model.named_modules():
        if isinstance(m._parameters.get("weight"), ParetoQQATWeight):
            out[name] = _fmt(m.weight.bits, m.weight.group_size)
        elif isinstance(m, ParetoQQATLinear):
            bits100, gs = (int(v) for v in m.weight_qat_format.tolist())
            out[name] = _fmt(bits100 / 100, gs or None)
    return out


def layer_configs(modules: Dict[str, Dict[str, object]], config_cls) -> Dict[str, object]:
    """``{name: config_cls(bits, group_size)}`` for ``quantize_layers``, one config object per
    (bits, group size), from a ``{name: {"bits", "group_size"}}`` table (``qat_modules``)."""
    shared: Dict[Tuple, object] = {}
    return {name: shared.setdefault((fmt["bits"], fmt["group_size"]),
                                    config_cls(bits=fmt["bits"], group_size=fmt["group_size"]))
            for name, fmt in modules.items()}


def _uniform(modules: Dict[str, Dict[str, object]], key: str):
    values = {json.dumps(d[key]) for d in modules.values()}
    return modules[next(iter(modules))][key] if len(values) == 1 else None


# --------------------------------------------------------------------------- transformers registration

class ParetoQHfConfig(QuantizationConfigMixin):
    """``quantization_config`` of a saved packed ParetoQ model (``quant_method="paretoq"``).

    Args:
        modules: {module name: {"bits": b, "group_size": g}} of every packed linear.
        bits, group_size: summary (the common value when all layers agree, else None).
        layout: the packed layout name (``paretoq_ao.LAYOUT``); reloading checks it. Folders written
            in a layout of ``packing.LEGACY_LAYOUTS`` load too (their ternary layers are repacked).
    """

    def __init__(self, modules: Optional[Dict[str, Dict[str, object]]] = None, bits=None,
                 group_size: Optional[int] = None, layout: str = LAYOUT, quant_method: str = QUANT_METHOD,
                 **kwargs):
        self.quant_method = QUANT_METHOD
        self.modules = {k: _fmt(v["bits"], v.get("group_size")) for k, v in (modules or {}).items()}
        self.bits = bits
        self.group_size = group_size
        self.layout = layout
        if quant_method != QUANT_METHOD:
            raise ValueError(f"ParetoQHfConfig: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if layout != LAYOUT and layout not in LEGACY_LAYOUTS:
            raise ValueError(f"ParetoQ checkpoint uses packed layout {layout!r}; this paretoq_ao reads "
                             f"{', '.join(map(repr, (LAYOUT,) + LEGACY_LAYOUTS))}")

    @classmethod
    def from_model(cls, model: nn.Module) -> "ParetoQHfConfig":
        mods = packed_modules(model)
        if not mods:
            raise ValueError("save_quantized: the model has no packed ParetoQ layers; convert it first with "
                             "paretoq_ao.quantize(model, ParetoQWeightOnlyConfig(bits=...))")
        return cls(modules=mods, bits=_uniform(mods, "bits"), group_size=_uniform(mods, "group_size"))

    def to_dict(self):
        return {"quant_method": QUANT_METHOD, "layout": self.layout, "bits": self.bits,
                "group_size": self.group_size, "modules": self.modules}


class _PackedPlaceholder(nn.Module):
    """Stands in for a packed ``weight`` while transformers loads ``<layer>.weight.qdata/.scale``."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", scale)


class ParetoQHfQuantizer(HfQuantizer):
    """Loads checkpoints written by ``save_quantized`` (pre-quantized only), and saves packed models
    with ``model.save_pretrained`` / ``push_to_hub``.

    transformers saves a model through the ``hf_quantizer`` attribute it holds: ``from_pretrained``
    sets it on the models it loads, and once ``paretoq_ao.hf`` is imported ``quantize_`` with a
    ParetoQ config sets it on the ``PreTrainedModel`` it converts (``_track_quantize_root``).
    ``is_serializable`` checks the model before transformers writes anything (a model with QAT
    layers is refused), ``get_state_dict_and_metadata`` lists the packed layers the model holds *now*
    in ``config.quantization_config`` and returns the tensors ``save_safetensors`` writes.
    """

    requires_calibration = True
    quantization_config: ParetoQHfConfig

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._model = None  # the model this quantizer belongs to (checked by is_serializable)
        self._activations: Dict[str, str] = {}  # loading: layer -> "int8" from the checkpoint metadata

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("ParetoQ packed models cannot be offloaded to disk")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self._activations = _check_checkpoint_keys(checkpoint_files, self.quantization_config.modules)
        named = dict(model.named_modules())
        missing = [n for n in self.quantization_config.modules if n not in named]
        if missing:
            raise ValueError(f"ParetoQ checkpoint lists packed layers that this model does not have: {missing[:5]}")
        for name, fmt in self.quantization_config.modules.items():
            mod = named[name]
            w = mod._parameters.get("weight")
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                raise ValueError(f"ParetoQ checkpoint: layer {name!r} ({type(mod).__name__}) has no 2-D weight")
            n, k = w.shape
            f = get_format(fmt["bits"])
            gs = fmt["group_size"]
            if gs is not None and k % gs:
                raise ValueError(f"ParetoQ checkpoint: group_size={gs} does not divide in_features={k} of {name!r}")
            groups = 1 if gs is None else k // gs
            row = legacy_row_bytes(k, f) if self.quantization_config.layout in LEGACY_LAYOUTS else packed_row_bytes(k, f)
            qdata = torch.empty(n, row, dtype=torch.uint8, device=w.device)
            scale = torch.empty(n, groups, dtype=w.dtype, device=w.device)
            del mod._parameters["weight"]
            mod.add_module("weight", _PackedPlaceholder(qdata, scale))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        named = dict(model.named_modules())
        for name, fmt in self.quantization_config.modules.items():
            mod = named[name]
            ph = mod._modules.get("weight")
            if not isinstance(ph, _PackedPlaceholder):
                continue
            if ph.qdata.is_meta or ph.scale.is_meta:
                raise ValueError(f"ParetoQ checkpoint is missing the packed weight of layer {name!r} "
                                 f"({name}.weight.qdata / {name}.weight.scale)")
            k = _in_features(mod, ph, fmt)
            qdata = ph.qdata
            if self.quantization_config.layout in LEGACY_LAYOUTS:
                qdata = from_legacy(qdata, k, fmt["bits"])
            packed = ParetoQPackedTensor(qdata, ph.scale, fmt["bits"], torch.Size([qdata.shape[0], k]),
                                         self._activations.get(name, "float"))
            del mod._modules["weight"]
            mod.weight = nn.Parameter(packed, requires_grad=False)
            mod._paretoq_load_hook = mod._register_load_state_dict_pre_hook(_check_loaded_packed, with_module=True)
        self._model = model
        return model

    def is_serializable(self):
        """Called first by ``save_pretrained`` (before any file or folder is written): refuses a model
        that the saved folder would not reproduce."""
        model = self._model
        if model is not None and not getattr(model, "_hf_peft_config_loaded", False):
            _check_saveable(model, "save_pretrained")
        return True

    def get_state_dict_and_metadata(self, model):
        """``model.save_pretrained``: the flattened tensors and metadata that ``save_safetensors``
        writes, and ``config.quantization_config`` listing the model's packed layers."""
        if getattr(model, "_hf_peft_config_loaded", False):
            return None, {}  # adapters only: transformers takes them from the model as for any model
        _check_saveable(model, "save_pretrained")
        if not packed_modules(model):  # nothing packed (any more): an ordinary float model
            if isinstance(getattr(model.config, "quantization_config", None), ParetoQHfConfig):
                del model.config.quantization_config
            return None, {}
        self.quantization_config = ParetoQHfConfig.from_model(model)  # the current layout
        model.config.quantization_config = self.quantization_config
        return flatten_packed(model)

    @property
    def is_trainable(self) -> bool:
        return False


def _check_saveable(model, what: str) -> None:
    """The save_pretrained checks: QAT layers cannot be written to a Hugging Face folder that
    ``from_pretrained`` reloads (it would give plain layers without their learned scales)."""
    qat = qat_modules(model)
    if qat:
        names = sorted(qat)
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        raise ValueError(
            f"{what}: layers {', '.join(map(repr, names[:3]))}{more} hold ParetoQ QAT weights, which "
            "from_pretrained would reload as plain float layers; save them with "
            "paretoq_ao.hf.save_qat_checkpoint(model, dir) (load_model/load_qat_checkpoint resume them), or "
            "convert first with paretoq_ao.quantize(model, ParetoQWeightOnlyConfig(bits=...)) and then save_pretrained "
            "or paretoq_ao.hf.save_quantized; nothing was written")


def _check_checkpoint_keys(checkpoint_files, modules) -> Dict[str, str]:
    """Every packed layer's ``.weight.qdata`` / ``.weight.scale`` must be in the checkpoint (read from
    the safetensors headers before loading: transformers would silently initialize missing ones).
    Returns {layer: activations} of the layers whose metadata sets activations other than "float"."""
    files = [f for f in (checkpoint_files or []) if str(f).endswith(".safetensors")]
    if not files:
        return {}
    from safetensors import safe_open

    keys, activations = set(), {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            keys.update(fh.keys())
            described = described_tensors(fh.metadata())
        for name, d in described.items():
            if isinstance(d, dict) and d.get("activations", "float") != "float" and name.endswith(".weight"):
                activations[name[: -len(".weight")]] = d["activations"]
    missing = [f"{n}.weight.{part}" for n in modules for part in ("qdata", "scale")
               if f"{n}.weight.{part}" not in keys]
    if missing:
        raise ValueError(f"ParetoQ checkpoint {os.path.dirname(str(files[0]))!r} is missing {len(missing)} packed "
                         f"tensor(s) of the layers its config lists: {missing[:5]}")
    return {n: a for n, a in activations.items() if n in modules}


def _in_features(mod, ph, fmt) -> int:
    k = getattr(mod, "in_features", None)
    if isinstance(k, int):
        return k
    gs = fmt["group_size"]
    if gs is not None:
        return ph.scale.shape[1] * gs
    raise ValueError(f"cannot tell the in_features of {type(mod).__name__}")


def _register() -> None:
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not ParetoQHfConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a reloaded module replaces its classes
        register_quantization_config(QUANT_METHOD)(ParetoQHfConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not ParetoQHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(ParetoQHfQuantizer)


_register()


# --------------------------------------------------------------------------- model.save_pretrained

def _track_quantize_root(model: nn.Module) -> None:
    """Give the ``PreTrainedModel`` that ``quantize_`` converts a ``ParetoQHfQuantizer`` as its
    ``hf_quantizer``, the attribute through which ``save_pretrained`` / ``push_to_hub`` save
    quantized models (``from_pretrained`` sets it on the packed models it loads). Models that hold
    another method's quantizer are left alone. Called (through ``hf_hook``, an entry point of
    ``paretoq_ao.after_quantize``) when a ``quantize_`` call with a ParetoQ config has converted its
    model."""
    if not isinstance(model, PreTrainedModel):
        return
    q = model.__dict__.get("hf_quantizer")
    if q is None:
        q = ParetoQHfQuantizer(ParetoQHfConfig())
        model.hf_quantizer = q
    if isinstance(q, ParetoQHfQuantizer):
        q._model = model
