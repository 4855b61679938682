"""Hugging Face integration: load causal LMs, save/reload packed ParetoQ models, QAT checkpoints.

Import it explicitly (``import paretoq_ao.hf``); ``import paretoq_ao`` never imports transformers.

    from torchao import quantize_
    import paretoq_ao.hf as pq_hf
    from paretoq_ao import ParetoQQATConfig, ParetoQWeightOnlyConfig

    model, tok = pq_hf.load_model("path/or/hub-id")
    quantize_(model, ParetoQQATConfig(bits=2))          # block linears only; the head stays FP
    ...train...
    pq_hf.save_qat_checkpoint(model, "ckpt", tok)      # latent weights + scales, resumable
    model, tok = pq_hf.load_qat_checkpoint("ckpt")
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    pq_hf.save_quantized(model, tok, "out")

    # later, in any process that has run ``import paretoq_ao.hf``:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out")   # packed low-bit weights

Design of the packed save / reload (why not transformers' ``TorchAoConfig``): transformers only
resolves torchao's own config classes and tensor subclasses, so instead this module registers its
own quantization method ``"paretoq"`` through transformers' public registry
(``register_quantization_config`` / ``register_quantizer``) when it is imported:

* ``out/model.safetensors`` is exactly the file ``paretoq_ao.save_safetensors`` writes: a packed
  weight ``<layer>.weight`` is stored as ``<layer>.weight.qdata`` (uint8, the packing.py layout) and
  ``<layer>.weight.scale``; ``paretoq_ao.load_safetensors`` reads it too. No repacking.
* ``out/config.json`` is the model's config with ``quantization_config`` =
  ``{"quant_method": "paretoq", "layout": ..., "bits": ..., "group_size": ...,
  "modules": {"<layer>": {"bits": b, "group_size": g}, ...}}`` -- every packed layer is listed,
  so reloading does not depend on re-running a filter.
* On ``from_pretrained`` the quantizer (``_process_model_before_weight_loading``) replaces the
  ``weight`` parameter of each listed Linear of the empty model by a placeholder submodule named
  ``weight`` holding two buffers ``qdata`` / ``scale`` with the packed shapes; transformers' ordinary
  loader then fills them by name from the checkpoint (plain tensors, no custom load op). After
  loading (``_process_model_after_weight_loading``) each placeholder becomes
  ``nn.Parameter(ParetoQPackedTensor(qdata, scale, bits, shape))`` -- the same model object that
  ``quantize_(model, ParetoQWeightOnlyConfig(...))`` produces, bit for bit.
* ``save_quantized`` writes all files into a staging folder inside ``out_dir`` and only then moves
  them into place one by one (``os.replace``), so a failure while writing leaves what was in
  ``out_dir`` untouched.
* ``model.save_pretrained(dir)`` / ``model.push_to_hub(repo)`` of a packed model write the same
  folder (config.json with that ``quantization_config``, model.safetensors as above -- transformers
  keeps one copy of tied tensors -- generation config; other files such as the tokenizer's are left
  alone). transformers saves quantized models through the model's ``hf_quantizer``:
  ``from_pretrained`` sets it, and after ``import paretoq_ao.hf`` the ParetoQ ``quantize_`` handlers
  set a ``ParetoQHfQuantizer`` on the ``PreTrainedModel`` passed to ``quantize_`` (a model converted
  before this module was imported, or through ``quantize_`` on a submodule, has none: use
  ``save_quantized``). Its ``is_serializable`` refuses models with QAT layers before anything is
  written (``save_qat_checkpoint`` saves those); ``get_state_dict_and_metadata`` lists the layers
  packed at save time. transformers writes the files in place, not staged: for a save that leaves
  the previous folder intact when it fails, use ``save_quantized``.
* A ``paretoq_qat.json`` left by an earlier ``save_qat_checkpoint`` in the same folder is ignored
  when config.json names quant_method "paretoq" (``save_pretrained`` cannot remove it).

QAT checkpoints (``save_qat_checkpoint`` / ``load_qat_checkpoint``) store the plain state dict
(latent ``weight``, ``weight_scale``, ``weight_qat_format`` per QAT layer), the model config, and
``paretoq_qat.json`` listing each QAT layer's bits/group size; loading rebuilds the model from
the config, re-applies ``ParetoQQATConfig`` to exactly those layers and loads the state dict
strictly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..formats import get_format
from ..packed import ParetoQPackedTensor, _check_loaded_packed
from ..packing import LAYOUT, LEGACY_LAYOUTS, from_legacy, legacy_row_bytes, packed_row_bytes
from ..qat import ParetoQQATConfig, ParetoQQATWeight
from ..serialization import save_safetensors

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

__all__ = [
    "QUANT_METHOD", "ParetoQHfConfig", "ParetoQHfQuantizer", "ModelLoadError",
    "load_model", "save_quantized", "save_qat_checkpoint", "load_qat_checkpoint",
    "packed_modules", "qat_modules",
]

QUANT_METHOD = "paretoq"
WEIGHTS_NAME = "model.safetensors"
QAT_NAME = "paretoq_qat.json"
DCP_DIR = "dcp"  # sibling of a checkpoint's model/ folder when its weights are sharded (DCP)

PathLike = Union[str, os.PathLike]


class ModelLoadError(OSError):
    """A model id or path could not be loaded (names the id/path and the reason)."""


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
                             "quantize_(model, ParetoQWeightOnlyConfig(bits=...))")
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
        return _flatten_packed(model)

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
            "convert first with quantize_(model, ParetoQWeightOnlyConfig(bits=...)) and then save_pretrained "
            "or paretoq_ao.hf.save_quantized; nothing was written")


def _check_checkpoint_keys(checkpoint_files, modules) -> Dict[str, str]:
    """Every packed layer's ``.weight.qdata`` / ``.weight.scale`` must be in the checkpoint (read from
    the safetensors headers before loading: transformers would silently initialize missing ones).
    Returns {layer: activations} of the layers whose metadata sets activations other than "float"."""
    files = [f for f in (checkpoint_files or []) if str(f).endswith(".safetensors")]
    if not files:
        return {}
    from safetensors import safe_open

    from ..serialization import _META_KEY

    keys, activations = set(), {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            keys.update(fh.keys())
            try:
                described = json.loads((fh.metadata() or {}).get(_META_KEY, "{}")).get("tensors", {})
            except (ValueError, AttributeError):
                described = {}
        for name, d in described.items():
            if isinstance(d, dict) and d.get("activations", "float") != "float" and name.endswith(".weight"):
                activations[name[: -len(".weight")]] = d["activations"]
    missing = [f"{n}.weight.{part}" for n in modules for part in ("qdata", "scale")
               if f"{n}.weight.{part}" not in keys]
    if missing:
        raise ValueError(f"ParetoQ checkpoint {os.path.dirname(str(files[0]))!r} is missing {len(missing)} packed "
                         f"tensor(s) of the layers its config lists: {missing[:5]}")
    return {n: a for n, a in activations.items() if n in modules}


def _tokenizer_files(folder: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
    return any(os.path.isfile(os.path.join(folder, n)) for n in names)


def _load_tokenizer(src: str):
    if os.path.isdir(src) and not _tokenizer_files(src):
        return None
    try:
        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, TypeError):
        return None


def _in_features(mod, ph, fmt) -> int:
    k = getattr(mod, "in_features", None)
    if isinstance(k, int):
        return k
    gs = fmt["group_size"]
    if gs is not None:
        return ph.scale.shape[1] * gs
    raise ValueError(f"cannot tell the in_features of {type(mod).__name__}")


def _flatten_packed(model):
    """The tensors and metadata ``save_safetensors`` writes for ``model`` (packed weights as
    ``<name>.qdata`` / ``<name>.scale``); tied tensors stay aliased for transformers to deduplicate."""
    from ..serialization import _META_KEY

    flat, described = {}, {}
    for name, t in model.state_dict().items():
        if isinstance(t, ParetoQPackedTensor):
            described[name] = {"bits": t.bits, "shape": list(t.shape)}
            if t.activations != "float":
                described[name]["activations"] = t.activations
            flat[f"{name}.qdata"], flat[f"{name}.scale"] = t.qdata, t.scale
        else:
            flat[name] = t
    return flat, {_META_KEY: json.dumps({"layout": LAYOUT, "tensors": described})}


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



# --------------------------------------------------------------------------- loading

def _resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"load_model: dtype must be a torch.dtype, its name or 'auto', got {dtype!r}")


def load_model(name_or_path: PathLike, dtype=None, device=None, tokenizer: bool = True,
               **kwargs) -> Tuple[nn.Module, Optional[object]]:
    """Load any causal LM (hub id or local folder) with ``AutoModelForCausalLM`` and its tokenizer.

    Returns ``(model, tokenizer_or_None)``; the model is in eval mode. ``dtype``: a torch dtype,
    its name, or "auto" (the checkpoint's); None keeps transformers' default. Folders written by
    ``save_quantized`` load as packed models, folders written by ``save_qat_checkpoint`` as QAT
    models. Raises ``ModelLoadError`` (an ``OSError``) naming the id/path when it cannot be found
    locally or downloaded, or when a local folder is not a readable model.
    """
    src = os.fspath(name_or_path)
    if _is_qat_folder(src):
        model, tok = load_qat_checkpoint(src, dtype=dtype, device=device)
        return model, (tok if tokenizer else None)
    local = os.path.exists(src)
    # a hub id is "name" or "org/name"; anything else can only be a local path
    looks_local = src.startswith((".", "/", "~")) or src.count("/") > 1 or (os.sep != "/" and os.sep in src)
    if local and not os.path.isdir(src):
        raise ModelLoadError(f"load_model: {src!r} is a file; pass the folder holding config.json and the weights")
    if local and not os.access(src, os.R_OK | os.X_OK):
        raise ModelLoadError(f"load_model: cannot read the folder {src!r} (permission denied)")
    if local and not os.path.isfile(os.path.join(src, "config.json")):
        raise ModelLoadError(f"load_model: {src!r} has no config.json; it is not a Hugging Face model folder")
    if not local and looks_local:
        raise ModelLoadError(f"load_model: no such folder {src!r}")
    kw = dict(kwargs)
    dt = _resolve_dtype(dtype)
    if dt is not None:
        kw["dtype"] = dt
    try:
        model = AutoModelForCausalLM.from_pretrained(src, **kw)
    except OSError as e:
        where = "the local folder" if local else "a local folder, the local Hugging Face cache or the Hub"
        raise ModelLoadError(
            f"load_model: {src!r} could not be found locally or downloaded (looked in {where}; offline "
            f"mode is {'on' if _offline() else 'off'}): {e}") from e
    tok = _load_tokenizer(src) if tokenizer else None
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok


def _saved_quant_method(folder: str):
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            q = json.load(f).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return q.get("quant_method") if isinstance(q, dict) else None


def _is_qat_folder(src: str) -> bool:
    """A folder ``save_qat_checkpoint`` wrote last: it has ``paretoq_qat.json`` and its config is not
    that of a packed model (``save_pretrained`` of a packed model over a QAT checkpoint rewrites
    config.json and the weights but cannot remove the QAT file)."""
    return (os.path.isdir(src) and os.path.isfile(os.path.join(src, QAT_NAME))
            and _saved_quant_method(src) != QUANT_METHOD)


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")


# --------------------------------------------------------------------------- saving

@contextlib.contextmanager
def _staging(out_dir: str):
    """Yields a staging folder inside ``out_dir``; on success its files are moved into ``out_dir``
    (``os.replace``), on failure it is removed and ``out_dir`` is unchanged."""
    from ..serialization import remove_stale_temporaries, temp_name

    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temporaries(out_dir)  # staging folders of saves that were killed
    stage = tempfile.mkdtemp(prefix=temp_name("save-"), dir=out_dir)
    try:
        yield stage
        for name in sorted(os.listdir(stage)):
            os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _fsync_dir(path):
    for dirpath, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())


def _write_config(model, stage: str, quantization_config: Optional[dict]) -> None:
    cfg = model.config
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    if quantization_config is not None:
        d["quantization_config"] = quantization_config
    d["architectures"] = [type(model).__name__]
    d["dtype"] = str(model.dtype).split(".")[1]
    d.pop("_name_or_path", None)
    with open(os.path.join(stage, "config.json"), "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        try:
            gen.save_pretrained(stage)
        except Exception:  # generation config is optional
            pass


def _save_common(model, tokenizer, out_dir, quant_cfg, extra_files: Dict[str, str]):
    out_dir = os.fspath(out_dir)
    with _staging(out_dir) as stage:
        _write_config(model, stage, quant_cfg)
        save_safetensors(model, os.path.join(stage, WEIGHTS_NAME))
        for name, text in extra_files.items():
            with open(os.path.join(stage, name), "w", encoding="utf-8") as f:
                f.write(text)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        _fsync_dir(stage)


def save_quantized(model: nn.Module, tokenizer, out_dir: PathLike) -> None:
    """Save a converted (packed) model with Hugging Face conventions.

    Writes ``config.json`` (with ``quantization_config``, quant_method "paretoq"),
    ``model.safetensors`` (packed weights as ``<layer>.weight.qdata`` / ``.scale``), the generation
    config, and the tokenizer files when ``tokenizer`` is given. After ``import paretoq_ao.hf``,
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` returns the same packed model. Files are
    staged and moved into place only once all are written: on failure ``out_dir`` is unchanged.
    """
    if not hasattr(model, "config"):
        raise TypeError("save_quantized: expected a transformers PreTrainedModel (with .config)")
    qat = qat_modules(model)
    if qat:
        raise ValueError(f"save_quantized: layers {sorted(qat)[:3]}... still hold QAT weights; convert with "
                         "quantize_(model, ParetoQWeightOnlyConfig(bits=...)) or use save_qat_checkpoint")
    qcfg = ParetoQHfConfig.from_model(model).to_dict()
    _save_common(model, tokenizer, out_dir, qcfg, {})
    stale = os.path.join(os.fspath(out_dir), QAT_NAME)  # a QAT checkpoint saved here before
    if os.path.exists(stale):
        os.unlink(stale)


def save_qat_checkpoint(model: nn.Module, out_dir: PathLike, tokenizer=None) -> None:
    """Save a model during/after ParetoQ QAT so that ``load_qat_checkpoint`` resumes it exactly.

    Writes ``config.json`` (no quantization_config: the latent weights are full precision),
    ``model.safetensors`` (the plain state dict: latent ``weight``, ``weight_scale``,
    ``weight_qat_format``), ``paretoq_qat.json`` (each QAT layer's bits / group size) and the
    tokenizer when given; staged like ``save_quantized``. Optimizer state is the caller's
    (``paretoq_ao.save(opt.state_dict(), path)``).
    """
    if not hasattr(model, "config"):
        raise TypeError("save_qat_checkpoint: expected a transformers PreTrainedModel (with .config)")
    mods = qat_modules(model)
    if not mods:
        raise ValueError("save_qat_checkpoint: the model has no ParetoQ QAT layers; apply "
                         "quantize_(model, ParetoQQATConfig(bits=...)) first")
    if packed_modules(model):
        raise ValueError("save_qat_checkpoint: the model holds packed layers; use save_quantized")
    meta = json.dumps({"format": "paretoq-qat-v1", "modules": mods}, indent=2, sort_keys=True) + "\n"
    _save_common(model, tokenizer, out_dir, None, {QAT_NAME: meta})


def load_qat_checkpoint(out_dir: PathLike, dtype=None, device=None):
    """Rebuild a model saved by ``save_qat_checkpoint``: ``(model, tokenizer_or_None)``, in train mode
    as QAT is resumed; its logits equal the saved model's."""
    from torchao import quantize_

    from ..serialization import load_safetensors

    src = os.fspath(out_dir)
    meta_path = os.path.join(src, QAT_NAME)
    if os.path.isfile(meta_path) and _saved_quant_method(src) == QUANT_METHOD:
        raise ModelLoadError(f"load_qat_checkpoint: {src!r} holds a packed ParetoQ model saved over an older QAT "
                             "checkpoint (its config.json has quantization_config); load it with load_model or "
                             "AutoModelForCausalLM.from_pretrained")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except OSError as e:
        raise ModelLoadError(f"load_qat_checkpoint: cannot read {meta_path!r}: {e}") from e
    if meta.get("format") != "paretoq-qat-v1":
        raise ValueError(f"load_qat_checkpoint: {meta_path!r} has unknown format {meta.get('format')!r}")
    try:
        config = AutoConfig.from_pretrained(src)
    except OSError as e:
        raise ModelLoadError(f"load_qat_checkpoint: cannot read the config in {src!r}: {e}") from e
    dt = _resolve_dtype(dtype)
    saved_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if dt in (None, "auto"):
        dt = getattr(torch, saved_dtype) if isinstance(saved_dtype, str) else (saved_dtype or torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=dt)
    groups: Dict[Tuple, set] = {}
    for name, fmt in meta["modules"].items():
        groups.setdefault((fmt["bits"], fmt["group_size"]), set()).add(name)
    named = dict(model.named_modules())
    unknown = [n for g in groups.values() for n in g if n not in named]
    if unknown:
        raise ValueError(f"load_qat_checkpoint: {meta_path!r} lists layers the model lacks: {unknown[:5]}")
    for (bits, gs), names in groups.items():
        quantize_(model, ParetoQQATConfig(bits=bits, group_size=gs), filter_fn=lambda m, fqn, s=names: fqn in s)
    dcp_dir = os.path.join(os.path.dirname(os.path.abspath(src)), DCP_DIR)
    if not os.path.isfile(os.path.join(src, WEIGHTS_NAME)) and os.path.isdir(dcp_dir):
        load_dcp_model_state(model, dcp_dir)  # a checkpoint of a distributed (sharded) run
    else:
        try:
            state = load_safetensors(os.path.join(src, WEIGHTS_NAME))
        except OSError as e:
            raise ModelLoadError(f"load_qat_checkpoint: cannot read the weights in {src!r}: {e}") from e
        _load_full_state(model, state, src)
    tok = _load_tokenizer(src)
    if device is not None:
        model.to(device)
    model.train()
    return model, tok


def save_qat_metadata(model: nn.Module, out_dir: PathLike, tokenizer=None) -> None:
    """The weightless part of ``save_qat_checkpoint`` (config, ``paretoq_qat.json``, tokenizer), for
    checkpoints whose weights are saved elsewhere (sharded, by ``torch.distributed.checkpoint``,
    in the sibling folder ``dcp/``)."""
    mods = qat_modules(model)
    if not mods:
        raise ValueError("save_qat_metadata: the model has no ParetoQ QAT layers")
    meta = json.dumps({"format": "paretoq-qat-v1", "modules": mods}, indent=2, sort_keys=True) + "\n"
    out_dir = os.fspath(out_dir)
    with _staging(out_dir) as stage:
        _write_config(model, stage, None)
        with open(os.path.join(stage, QAT_NAME), "w", encoding="utf-8") as f:
            f.write(meta)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        _fsync_dir(stage)


def load_dcp_model_state(model: nn.Module, dcp_dir: str) -> None:
    """Load the model part (keys ``model.*``) of a ``torch.distributed.checkpoint`` folder into a
    model of any sharding (plain, or FSDP2 on any number of ranks): DCP reshards as it reads."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from torch.distributed.checkpoint.api import CheckpointException

    from .distributed import dcp_load

    msd = get_model_state_dict(model)
    try:
        dcp_load({"model": msd}, dcp_dir)
    except (Exception, CheckpointException) as e:  # DCP wraps failures (missing files, shapes) in its own types
        first = str(e).strip().splitlines()
        raise ModelLoadError(f"cannot load the sharded checkpoint {dcp_dir!r}: "
                             f"{type(e).__name__}: {first[-1] if first else ''}") from e
    set_model_state_dict(model, msd)


def _load_full_state(model: nn.Module, state: Dict[str, torch.Tensor], src: str) -> None:
    """Strict load (tied parameters may be present under one of their names only)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    # tied weights: the checkpoint holds each copy (save_safetensors clones aliases), but accept one.
    ptrs = {}
    for k, v in expected.items():
        ptrs.setdefault(v.untyped_storage().data_ptr() if not v.is_meta else id(v), []).append(k)
    still = []
    for k in missing:
        group = next((g for g in ptrs.values() if k in g), [k])
        if not any(o in state for o in group):
            still.append(k)
    unexpected = [k for k in state if k not in expected]
    if still or unexpected:
        raise ValueError(f"load_qat_checkpoint: {src!r} does not match the model: missing {still[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
