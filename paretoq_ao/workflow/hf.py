"""Hugging Face integration: load causal LMs, save/reload packed ParetoQ models, QAT checkpoints.

Import it explicitly (``import paretoq_ao.hf``); ``import paretoq_ao`` never imports transformers.

    import paretoq_ao.hf as pq_hf
    from paretoq_ao import ParetoQQATConfig, ParetoQWeightOnlyConfig, quantize

    model, tok = pq_hf.load_model("path/or/hub-id")
    quantize(model, ParetoQQATConfig(bits=2))           # block linears only; the head stays FP
    ...train...
    pq_hf.save_qat_checkpoint(model, "ckpt", tok)      # latent weights + scales, resumable
    model, tok = pq_hf.load_qat_checkpoint("ckpt")
    quantize(model, ParetoQWeightOnlyConfig(bits=2))
    pq_hf.save_quantized(model, tok, "out")

    # later, in any process that has run ``import paretoq_ao.hf``:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out")   # packed low-bit weights

Design of the packed save / reload (why not transformers' ``TorchAoConfig``): transformers only
resolves torchao's own config classes and tensor subclasses, so instead this module registers its
own quantization method ``"paretoq"`` through transformers' public registry
(``register_quantization_config`` / ``register_quantizer``) when it is imported (``hf_quantizer``):

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
  ``paretoq_ao.quantize(model, ParetoQWeightOnlyConfig(...))`` produces, bit for bit.
* ``save_quantized`` writes all files into a staging folder inside ``out_dir`` and only then moves
  them into place one by one (``os.replace``), so a failure while writing leaves what was in
  ``out_dir`` untouched.
* ``model.save_pretrained(dir)`` / ``model.push_to_hub(repo)`` of a packed model write the same
  folder (config.json with that ``quantization_config``, model.safetensors as above -- transformers
  keeps one copy of tied tensors -- generation config; other files such as the tokenizer's are left
  alone). transformers saves quantized models through the model's ``hf_quantizer``:
  ``from_pretrained`` sets it, and (transformers imported) ``paretoq_ao.quantize`` (and a direct
  ``quantize_`` call it recognises) sets a ``ParetoQHfQuantizer`` on the ``PreTrainedModel`` it
  converts (a model converted through ``quantize_`` on a submodule has none: use
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

from .._targets import quantize_layers
from ..qat import ParetoQQATConfig
from ..serialization import save_safetensors
from .hf_quantizer import (QUANT_METHOD, ParetoQHfConfig, ParetoQHfQuantizer,  # registers "paretoq"
                           layer_configs, packed_modules, qat_modules)

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

__all__ = [
    "QUANT_METHOD", "ParetoQHfConfig", "ParetoQHfQuantizer", "ModelLoadError",
    "load_model", "save_quantized", "save_qat_checkpoint", "load_qat_checkpoint",
    "packed_modules", "qat_modules", "layer_configs",
]

WEIGHTS_NAME = "model.safetensors"
QAT_NAME = "paretoq_qat.json"
QAT_FORMAT = "paretoq-qat-v1"  # the "format" entry of QAT_NAME
DCP_DIR = "dcp"  # sibling of a checkpoint's model/ folder when its weights are sharded (DCP)

PathLike = Union[str, os.PathLike]


class ModelLoadError(OSError):
    """A model id or path could not be loaded (names the id/path and the reason)."""


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


def _save_common(model, tokenizer, out_dir, quant_cfg, extra_files: Dict[str, str], weights: bool = True):
    out_dir = os.fspath(out_dir)
    with _staging(out_dir) as stage:
        _write_config(model, stage, quant_cfg)
        if weights:
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
                         "paretoq_ao.quantize(model, ParetoQWeightOnlyConfig(bits=...)) or use save_qat_checkpoint")
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
                         "paretoq_ao.quantize(model, ParetoQQATConfig(bits=...)) first")
    if packed_modules(model):
        raise ValueError("save_qat_checkpoint: the model holds packed layers; use save_quantized")
    _save_common(model, tokenizer, out_dir, None, {QAT_NAME: _qat_meta(mods)})


def _qat_meta(mods: Dict[str, Dict[str, object]]) -> str:
    """The text of ``paretoq_qat.json``: each QAT layer's bits / group size."""
    return json.dumps({"format": QAT_FORMAT, "modules": mods}, indent=2, sort_keys=True) + "\n"


def load_qat_checkpoint(out_dir: PathLike, dtype=None, device=None):
    """Rebuild a model saved by ``save_qat_checkpoint``: ``(model, tokenizer_or_None)``, in train mode
    as QAT is resumed; its logits equal the saved model's."""
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
    if meta.get("format") != QAT_FORMAT:
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
    named = dict(model.named_modules())
    unknown = [n for n in meta["modules"] if n not in named]
    if unknown:
        raise ValueError(f"load_qat_checkpoint: {meta_path!r} lists layers the model lacks: {unknown[:5]}")
    quantize_layers(model, layer_configs(meta["modules"], ParetoQQATConfig))
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
    _save_common(model, tokenizer, out_dir, None, {QAT_NAME: _qat_meta(mods)}, weights=False)


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
