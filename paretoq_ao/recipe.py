"""The ParetoQ training recipe as a Python API (the CLI ``paretoq qat`` only parses flags and calls it).

    from paretoq_ao.recipe import QATRecipe, run_qat

    result = run_qat(QATRecipe(model="meta-llama/Llama-3.2-1B", bits=2,
                               pretrain_tokens=9e12, token_fraction=0.1, output_dir="run"))
    # or an explicit budget:  QATRecipe(..., tokens=50_000_000)  or  QATRecipe(..., steps=1000)

What ``run_qat`` does:

1. loads the full-precision model (hub id or local folder via ``paretoq_ao.hf.load_model``, or
   ``model="tiny"``: a small Llama built from a config, with a BPE tokenizer trained offline on the
   training text) -- or uses a model object passed in;
2. ``quantize_(model, ParetoQQATConfig(bits, group_size))`` with the default filter (every block
   linear; embeddings and the output head stay full precision); a model with no such layer is an
   error;
3. trains with the paper's recipe: AdamW with zero weight decay, the scales in the same optimizer
   and LR, cosine decay to zero, no warmup, LR 2e-5 at 1 / 1.58 / 2 bits and 1e-5 at 3 / 4 bits
   (``lr=`` overrides), plain next-token cross-entropy; gradient accumulation, gradient clipping
   (1.0), optional bf16 autocast and ``torch.compile``. The budget is ``steps``, or ``tokens``, or
   ``token_fraction`` (paper: 0.1) of a stated ``pretrain_tokens``;
4. checkpoints every ``save_every`` optimizer steps (and at the end / at ``stop_after``) into
   ``output_dir/checkpoint-<step>/``: ``model/`` (``hf.save_qat_checkpoint``: latent weights,
   scales, config, tokenizer) and ``trainer_state.pt`` (optimizer, scheduler, data position,
   RNG states, step, and the settings). A checkpoint is built in a hidden folder, renamed into
   place, and only then named in ``output_dir/latest`` (written atomically); a failed save (disk
   full, ...) leaves the previous checkpoint and ``latest`` untouched. Re-running with the same
   settings resumes exactly: the resumed run's losses and parameters are bit-identical to an
   uninterrupted run's. A checkpoint made with other settings is refused, naming what differs;
5. distributed: under ``torchrun --nproc_per_node N`` (or with a process group already initialised)
   the same call joins the process group, shards the model with FSDP2
   (``paretoq_ao.distributed.shard_model``: each transformer block, then the root; optimizer state
   is sharded with the parameters), gives each rank ``batch_size / N`` rows of every global batch
   (``batch_size`` stays the global batch, so the run is the single-process run up to float
   summation order), averages the logged loss over ranks, and writes checkpoints with
   ``torch.distributed.checkpoint``: ``checkpoint-<step>/dcp/`` (sharded model + optimizer),
   ``model/`` (config, ``paretoq_qat.json``, tokenizer; no weights) and ``trainer_state.pt``. Such a
   checkpoint resumes on any number of ranks (one included) and ``paretoq convert``/``eval`` read it
   directly; a single-process checkpoint in the default format resumes on N ranks too.
   ``activation_checkpointing`` recomputes each block in the backward pass (with or without FSDP);
6. logs the curve to ``output_dir/log.jsonl`` (one JSON object per optimizer step, flushed
   line by line; a resumed run appends a ``{"event": "resume"}`` line; ``read_log`` keeps the last
   record of each step), and shows a tqdm bar with the loss and tokens/s.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from . import serialization
from .formats import get_format

_log = logging.getLogger(__name__)

__all__ = [
    "QATRecipe", "QATResult", "RecipeError", "CheckpointError", "paper_lr", "tiny_llama",
    "run_qat", "qat", "resolve_steps", "latest_checkpoint", "read_log", "convert_checkpoint",
    "quantized_layer_count", "demo", "DemoRow", "plot_pareto", "format_table",
    "to_packed", "resolve_qat_checkpoint", "train_steps",
]

STATE_NAME = "trainer_state.pt"
LATEST_NAME = "latest"
LOG_NAME = "log.jsonl"
STATE_FORMAT = "paretoq-recipe-v1"


class RecipeError(ValueError):
    """Bad recipe input (model, data, budget, settings); the message says what to change."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not belong to this run."""


def paper_lr(bits) -> float:
    """The paper's learning rate: 2e-5 for 1 / 1.58 / 2 bits, 1e-5 for 3 / 4 bits."""
    return 2e-5 if get_format(bits).bits <= 2 else 1e-5


# The numeric settings and their ranges: kind "count" (whole >= 1), "whole" (>= 0), "positive"
# (finite > 0), "non_negative", "fraction" (0 < x <= 1), "seed" (whole in [0, 2**63)); optional: None allowed.
_FIELD_RANGES = {
    "group_size": ("count", True), "max_chars": ("count", True), "block_size": ("count", False),
    "vocab_size": ("count", False), "steps": ("count", True), "tokens": ("count", True),
    "pretrain_tokens": ("positive", True), "token_fraction": ("fraction", False), "batch_size": ("count", False),
    "grad_accum": ("count", False), "lr": ("positive", True), "weight_decay": ("non_negative", False),
    "max_grad_norm": ("positive", True), "seed": ("seed", False), "save_every": ("whole", False),
    "keep_last": ("count", False), "stop_after": ("count", True), "dist_timeout": ("positive", False),
}
_KIND_TEXT = {"count": "a whole number >= 1", "whole": "a whole number >= 0", "positive": "a finite number > 0",
              "non_negative": "a finite number >= 0", "fraction": "a number in (0, 1]",
              "seed": "a whole number in [0, 2**63)"}


def _check_field(name: str, v: Any, kind: str, optional: bool) -> Any:
    """``v`` if it is in range (a whole float such as 2e5 becomes an int), else RecipeError."""
    if v is None and optional:
        return v
    if isinstance(v, float) and kind in ("count", "whole", "seed") and v.is_integer():
        v = int(v)
    whole = isinstance(v, int) and not isinstance(v, bool)
    number = (whole or isinstance(v, float)) and math.isfinite(v)
    ok = {"count": whole and v >= 1, "whole": whole and v >= 0, "seed": whole and 0 <= v < 2 ** 63,
          "positive": number and v > 0, "non_negative": number and v >= 0,
          "fraction": number and 0 < v <= 1}[kind]
    if not ok:
        raise RecipeError(f"QATRecipe.{name} must be {_KIND_TEXT[kind]}{' or None' if optional else ''}, got {v!r}")
    return v


@dataclass
class QATRecipe:
    """Settings of one ParetoQ QAT run (see the module docstring)."""

    model: str = "tiny"  # hub id, local folder, or "tiny" (small Llama from a config)
    bits: float = 2
    group_size: Optional[int] = None
    # data
    data: str = "stdlib"  # "stdlib", a local .txt/.jsonl file or folder, or a datasets name
    text_field: str = "text"
    max_chars: Optional[int] = None
    block_size: int = 128
    vocab_size: int = 1024  # tokenizer trained for model="tiny"
    model_config: Dict[str, Any] = field(default_factory=dict)  # LlamaConfig overrides for "tiny"
    # budget (first one given wins: steps, tokens, token_fraction * pretrain_tokens)
    steps: Optional[int] = None
    tokens: Optional[int] = None
    pretrain_tokens: Optional[float] = None
    token_fraction: float = 0.1
    # optimisation
    batch_size: int = 8
    grad_accum: int = 1
    lr: Optional[float] = None  # None: paper_lr(bits)
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    bf16: bool = False
    compile: bool = False
    seed: int = 0
    device: Optional[str] = None
    # run management
    output_dir: Optional[str] = "paretoq-qat"
    save_every: int = 0  # optimizer steps; 0: only at the end / at stop_after
    keep_last: int = 1
    resume: bool = True
    stop_after: Optional[int] = None  # stop (and checkpoint) after this optimizer step
    progress: bool = True
    # memory / distributed
    activation_checkpointing: bool = False
    checkpoint_format: str = "auto"  # "auto" (dcp when distributed, else safetensors), "dcp", "safetensors"
    dist_timeout: float = 600.0  # seconds any collective may wait (a hung rank fails the job)

    def __post_init__(self):
        self.bits = get_format(self.bits).bits
        for name, (kind, optional) in _FIELD_RANGES.items():
            setattr(self, name, _check_field(name, getattr(self, name), kind, optional))
        if not isinstance(self.model_config, dict):
            raise RecipeError(f"model_config must be a dict of LlamaConfig overrides, got {self.model_config!r}")
        if self.model == "tiny":
            _check_tiny_config(self.model_config)  # before any data is read
        if self.device is not None:
            from .generate import resolve_device

            try:
                resolve_device(self.device)  # 'cuda' without CUDA: refused now, not at the first step
            except ValueError as e:
                raise RecipeError(f"QATRecipe.device: {e}") from None
        if self.checkpoint_format not in ("auto", "dcp", "safetensors"):
            raise RecipeError(f"checkpoint_format must be 'auto', 'dcp' or 'safetensors', got {self.checkpoint_format!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.block_size

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else paper_lr(self.bits)

    def fingerprint(self) -> Dict[str, Any]:
        """Settings a checkpoint must share with the run that resumes it."""
        return {
            "model": self.model, "model_config": dict(sorted(self.model_config.items())),
            "bits": self.bits, "group_size": self.group_size, "data": self.data,
            "text_field": self.text_field, "max_chars": self.max_chars, "block_size": self.block_size,
            "vocab_size": self.vocab_size if self.model == "tiny" else None,
            "batch_size": self.batch_size, "grad_accum": self.grad_accum, "steps": resolve_steps(self),
            "lr": self.learning_rate, "weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm,
            "bf16": self.bf16, "seed": self.seed,
        }


@dataclass
class QATResult:
    model: nn.Module
    tokenizer: Any
    steps: int  # optimizer steps done in total (including those before a resume)
    total_steps: int
    tokens: int  # training tokens seen in total
    losses: List[float]  # losses of the steps run in this call
    checkpoint: Optional[str]  # the latest checkpoint folder
    log_path: Optional[str]
    resumed_from: Optional[int] = None


def resolve_steps(r: QATRecipe) -> int:
    """Optimizer steps of the run: ``steps``, else ceil(tokens / tokens_per_step)."""
    if r.steps is not None:
        if r.steps < 1:
            raise RecipeError(f"steps must be >= 1, got {r.steps}")
        return int(r.steps)
    tokens = r.tokens
    if tokens is None and r.pretrain_tokens is not None:
        if not 0 < r.token_fraction <= 10:
            raise RecipeError(f"token_fraction must be in (0, 10], got {r.token_fraction}")
        tokens = r.token_fraction * float(r.pretrain_tokens)
    if tokens is None:
        raise RecipeError("no training budget: give steps, tokens, or pretrain_tokens (QAT uses "
                          "token_fraction of it, 0.1 by default as in the paper)")
    if tokens <= 0:
        raise RecipeError(f"the token budget must be positive, got {tokens}")
    return max(1, math.ceil(tokens / r.tokens_per_step))


# --------------------------------------------------------------------------- models and data

def _check_tiny_config(overrides: Dict[str, Any]) -> None:
    """LlamaConfig overrides of the tiny model: known keys (a misspelling would be ignored by
    LlamaConfig) and whole, positive sizes."""
    from transformers import LlamaConfig

    known = set(LlamaConfig().to_dict())
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        import difflib

        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else repr(k)
                 for k in unknown]
        raise RecipeError(f"tiny model config: unknown LlamaConfig key(s) {', '.join(hints)}")
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings"):
        v = overrides.get(k, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise RecipeError(f"tiny model config: {k} must be a whole number >= 1, got {v!r}")


def tiny_llama(vocab_size: int, seed: int = 0, **overrides) -> nn.Module:
    """A small Llama-style causal LM built from a config (random init, float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    _check_tiny_config(overrides)
    kw.update(overrides)
    torch.manual_seed(seed)
    from huggingface_hub.errors import StrictDataclassError  # LlamaConfig's own validation

    try:
        cfg = LlamaConfig(**kw)
        return LlamaForCausalLM(cfg)
    except (TypeError, ValueError, RuntimeError, StrictDataclassError) as e:
        cause = e.__cause__ if isinstance(e, StrictDataclassError) and e.__cause__ else e
        raise RecipeError(f"invalid tiny model config {overrides}: {str(cause).strip().splitlines()[-1]}") from None


def quantized_layer_count(model: nn.Module) -> int:
    from .qat import ParetoQQATWeight

    return sum(isinstance(m._parameters.get("weight"), ParetoQQATWeight) for m in model.modules())


def _fp32_master_weights(model: nn.Module) -> None:
    """Latent weights, scales (made from them) and so the optimizer state are float32, whatever
    dtype the checkpoint ships in: at the paper's LR of 2e-5 most bf16 updates would round away.
    ``bf16=True`` computes in bf16 under autocast; the master copy stays float32."""
    low = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if low:
        _log.info("QAT: %s parameters converted to float32 master weights", ", ".join(low))
        model.float()


def _apply_qat(model: nn.Module, r: QATRecipe) -> None:
    from torchao import quantize_

    from .qat import ParetoQQATConfig

    try:
        quantize_(model, ParetoQQATConfig(bits=r.bits, group_size=r.group_size))
    except ValueError as e:
        raise RecipeError(str(e).replace("\n  ", " | ")) from None
    if quantized_layer_count(model) == 0:
        raise RecipeError(f"model {r.model!r} ({type(model).__name__}) has no linear layers to quantize "
                          "(ParetoQ quantizes the nn.Linear layers of the transformer blocks; the output "
                          "head stays full precision)")


def _load_texts_or_fail(r: QATRecipe, split: str):
    from .data import load_texts

    try:
        texts = load_texts(r.data, split, text_field=r.text_field, max_chars=r.max_chars)
    except (OSError, ValueError) as e:
        raise RecipeError(f"data {r.data!r}: {e}") from None
    if not texts:
        raise RecipeError(f"data {r.data!r} (split {split!r}) holds no text")
    return texts


def build_train_blocks(r: QATRecipe, tokenizer):
    from .data import PackedBlocks, tokenize

    texts = _load_texts_or_fail(r, "train")
    try:
        return PackedBlocks(tokenize(texts, tokenizer), r.block_size, source=f"{r.data}[train]")
    except ValueError as e:
        raise RecipeError(str(e)) from None


def _make_sampler(r: QATRecipe, blocks, rank: int = 0, world_size: int = 1):
    from .data import BlockSampler

    if len(blocks) < r.batch_size:
        raise RecipeError(f"data {r.data!r} is too short: {len(blocks)} block(s) of {r.block_size} tokens, "
                          f"fewer than one batch of {r.batch_size}; use more text or a smaller "
                          "batch_size / block_size")
    return BlockSampler(blocks, r.batch_size, seed=r.seed, rank=rank, world_size=world_size)


def _check_world_size(r: QATRecipe, world_size: int) -> None:
    if r.batch_size % world_size:
        raise RecipeError(f"batch_size {r.batch_size} (the global batch) is not divisible by the world size "
                          f"{world_size}: each rank takes batch_size / world_size blocks per micro-step; use a "
                          f"batch_size that is a multiple of {world_size}")


def _load_base_model(r: QATRecipe):
    """(model, tokenizer, train_blocks or None) for ``r.model``."""
    if r.model == "tiny":
        from .data import train_tokenizer

        texts = _load_texts_or_fail(r, "train")
        tok = train_tokenizer(texts, r.vocab_size)
        model = tiny_llama(len(tok), seed=r.seed, **r.model_config)
        return model, tok
    from .hf import load_model

    if os.path.isfile(os.path.join(os.fspath(r.model), LATEST_NAME)):
        raise RecipeError(f"model {r.model!r} is a `paretoq qat` output folder: continue that run with "
                          f"--output-dir {r.model}, or pack it with `paretoq convert {r.model} <out>`; "
                          "--model takes the full-precision model QAT starts from")
    model, tok = load_model(r.model)  # ModelLoadError (an OSError) names the id/path
    _refuse_quantized_start(model, r.model)
    if tok is None:
        raise RecipeError(f"model {r.model!r} has no tokenizer files; save one next to it")
    if model.get_input_embeddings().num_embeddings < len(tok):
        raise RecipeError(f"model {r.model!r}: its tokenizer has {len(tok)} tokens but the model's embedding "
                          f"only {model.get_input_embeddings().num_embeddings} rows; use the tokenizer saved "
                          "with the model (or resize the embedding with model.resize_token_embeddings)")
    return model, tok


def _refuse_quantized_start(model: nn.Module, name: str) -> None:
    """QAT starts from a full-precision model: refuse a packed folder or a QAT checkpoint, once."""
    from .packed import ParetoQPackedTensor
    from .qat import ParetoQQATWeight

    for kind, what, fix in ((ParetoQPackedTensor, "packed (a `paretoq convert` output)",
                             "QAT starts from the full-precision model the packed one was made from"),
                            (ParetoQQATWeight, "a QAT checkpoint (ParetoQ fake-quant weights)",
                             "continue its run with --output-dir <its qat output folder>, or pack it with "
                             "`paretoq convert`")):
        layers = [n for n, m in model.named_modules() if isinstance(m._parameters.get("weight"), kind)]
        if layers:
            raise RecipeError(f"model {name!r} is {what}: {len(layers)} layers (first {layers[0]!r}) already "
                              f"quantized; {fix}")


# --------------------------------------------------------------------------- RNG state

def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- checkpoints

def latest_checkpoint(output_dir) -> Optional[str]:
    """The folder named by ``output_dir/latest`` (None when there is none)."""
    path = os.path.join(os.fspath(output_dir), LATEST_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        name = f.read().strip()
    ckpt = os.path.join(os.fspath(output_dir), name)
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"{path} names {name!r}, which does not exist")
    return ckpt


def _describe_diff(saved: Dict[str, Any], now: Dict[str, Any]) -> str:
    keys = sorted(set(saved) | set(now))
    diffs = [f"{k}={saved.get(k)!r} (this run: {now.get(k)!r})" for k in keys if saved.get(k) != now.get(k)]
    return ", ".join(diffs)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _save_checkpoint(output_dir: str, step: int, model, tokenizer, opt, sched, sampler, r: QATRecipe,
                     tokens_seen: int) -> str:
    from .hf import save_qat_checkpoint

    name = f"checkpoint-{step:08d}"
    final = os.path.join(output_dir, name)
    tmp = os.path.join(output_dir, serialization.temp_name(name))  # removed if this process dies
    state = {
        "format": STATE_FORMAT, "step": step, "tokens": tokens_seen, "settings": r.fingerprint(),
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "sampler": sampler.state_dict(),
        "rng": _rng_state(),
    }
    previous = latest_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    try:
        os.makedirs(tmp)
        save_qat_checkpoint(model, os.path.join(tmp, "model"), tokenizer)
        serialization.save(state, os.path.join(tmp, STATE_NAME))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        serialization.atomic_write(os.path.join(output_dir, LATEST_NAME), lambda p: _write_text(p, name + "\n"))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError):
            raise
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        kept = (f"the previous checkpoint {previous} is intact" if previous
                else "no earlier checkpoint exists")
        raise CheckpointError(f"could not save the checkpoint of step {step} in {output_dir}: {reason}; "
                              f"{kept}") from e
    # prune older checkpoints (after `latest` moved on)
    olds = sorted(n for n in os.listdir(output_dir) if n.startswith("checkpoint-") and n != name)
    for n in olds[: max(0, len(olds) - (r.keep_last - 1))]:
        shutil.rmtree(os.path.join(output_dir, n), ignore_errors=True)
    return final


def _read_state(ckpt: str) -> Dict[str, Any]:
    path = os.path.join(ckpt, STATE_NAME)
    try:
        state = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"cannot read the trainer state {path}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a paretoq recipe checkpoint")
    return state


def _check_settings(ckpt: str, state: Dict[str, Any], r: QATRecipe) -> None:
    saved, now = state["settings"], r.fingerprint()
    if saved != now:
        raise CheckpointError(f"checkpoint {ckpt} was made with other settings: {_describe_diff(saved, now)}; "
                              "use the same settings to resume, or another output_dir")


def _load_model_state(model, ckpt: str) -> None:
    from .serialization import load_safetensors

    path = os.path.join(ckpt, "model", "model.safetensors")
    try:
        sd = load_safetensors(path)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    try:
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt} does not match the model: {str(e).splitlines()[0]}") from None


def _failure_reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        return "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: (exception, traceback)}
    if isinstance(failures, dict) and failures:
        return "; ".join(f"rank {rank}: {_failure_reason(exc[0] if isinstance(exc, tuple) else exc)}"
                         for rank, exc in sorted(failures.items()))
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _is_comm_error(e: BaseException) -> bool:
    """A collective failed: a peer died, or hung past ``dist_timeout`` (gloo reports both as plain
    RuntimeErrors, NCCL as DistBackendError)."""
    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e)
    return any(k in text for k in ("gloo", "NCCL", "Timed out", "Connection closed", "Connection reset"))


def _dcp_errors():
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)  # CheckpointException derives from BaseException


def _dcp_state(model, opt) -> Dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def _save_checkpoint_dcp(output_dir: str, step: int, model, tokenizer, opt, sched, sampler, r: QATRecipe,
                         tokens_seen: int, world_size: int) -> str:
    """A checkpoint written with ``torch.distributed.checkpoint`` by every rank (see the module doc).

    Built in ``.tmp-checkpoint-<step>/``; rank 0 renames it into place and only then rewrites
    ``latest``, after every rank's shards are on disk. A rank that fails (or a crash) at any point
    leaves the previous checkpoint and ``latest`` as they were; a failure is raised on every rank."""
    from .distributed import all_ok, dcp_save, from_main, world_info
    from .hf import DCP_DIR, save_qat_metadata

    main = world_info().is_main
    name = f"checkpoint-{step:08d}"
    final = os.path.join(output_dir, name)
    tmp = from_main(os.path.join(output_dir, serialization.temp_name(name)))  # named after rank 0's process
    previous, err = None, None
    if main:
        try:
            previous = latest_checkpoint(output_dir) if os.path.isdir(output_dir) else None
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except (OSError, CheckpointError) as e:
            err = e
    ok = all_ok(err is None)
    if ok:
        try:
            dcp_save(_dcp_state(model, opt), os.path.join(tmp, DCP_DIR))
        except _dcp_errors() as e:  # DCP raises (its CheckpointException) on every rank when one fails
            err = e
        ok = all_ok(err is None)
    if ok and main:
        state = {
            "format": STATE_FORMAT, "step": step, "tokens": tokens_seen, "settings": r.fingerprint(),
            "checkpoint_format": "dcp", "world_size": world_size,
            "scheduler": sched.state_dict(), "sampler": sampler.state_dict(), "rng": _rng_state(),
        }
        try:
            save_qat_metadata(model, os.path.join(tmp, "model"), tokenizer)
            serialization.save(state, os.path.join(tmp, STATE_NAME))
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            serialization.atomic_write(os.path.join(output_dir, LATEST_NAME),
                                       lambda p: _write_text(p, name + "\n"))
        except OSError as e:
            err = e
    if ok:
        ok = all_ok(err is None)
    if not ok:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = _failure_reason(err) if err is not None else "another rank failed to write its part"
        kept = (f"the previous checkpoint {previous} is intact" if previous else
                "the previous checkpoint (if any) is intact") if main else "the previous checkpoint is intact"
        raise CheckpointError(f"could not save the checkpoint of step {step} in {output_dir}: {reason}; "
                              f"{kept}") from err
    if main:
        olds = sorted(n for n in os.listdir(output_dir) if n.startswith("checkpoint-") and n != name)
        for n in olds[: max(0, len(olds) - (r.keep_last - 1))]:
            shutil.rmtree(os.path.join(output_dir, n), ignore_errors=True)
    return final


def _check_layer_formats(model, ckpt: str) -> None:
    from .hf import QAT_NAME, qat_modules

    path = os.path.join(ckpt, "model", QAT_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f).get("modules", {})
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    now = qat_modules(model)
    for name in sorted(set(saved) | set(now)):
        if saved.get(name) != now.get(name):
            raise CheckpointError(f"checkpoint {ckpt} layer {name!r} is {saved.get(name)} but this model's is "
                                  f"{now.get(name)}")


def _load_checkpoint(model, opt, ckpt: str, state: Dict[str, Any], sharded: bool) -> None:
    """Model and optimizer state from ``ckpt``, whichever format it has, into a plain or FSDP model."""
    from .hf import DCP_DIR

    dcp_dir = os.path.join(ckpt, DCP_DIR)
    if os.path.isdir(dcp_dir):
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from .distributed import dcp_load

        _check_layer_formats(model, ckpt)
        sd = _dcp_state(model, opt)
        try:
            dcp_load(sd, dcp_dir)
        except _dcp_errors() as e:
            raise CheckpointError(f"cannot load the sharded checkpoint {dcp_dir}: {_failure_reason(e)}") from e
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        return
    if not sharded:
        _load_model_state(model, ckpt)
        opt.load_state_dict(state["optimizer"])
        return
    # a single-process checkpoint (full tensors) resumed on several ranks: each rank keeps its shard
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from .serialization import load_safetensors

    path = os.path.join(ckpt, "model", "model.safetensors")
    try:
        msd = load_safetensors(path)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    full = StateDictOptions(full_state_dict=True)
    try:
        set_model_state_dict(model, msd, options=full)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {ckpt} does not match the model: {str(e).splitlines()[0]}") from None
    names = [n for n, _ in model.named_parameters()]
    osd = state["optimizer"]
    fqn_osd = {"state": {names[i]: v for i, v in osd["state"].items()},
               "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in osd["param_groups"]]}
    set_optimizer_state_dict(model, opt, fqn_osd, options=full)


# --------------------------------------------------------------------------- log

class _Log:
    def __init__(self, path: Optional[str]):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            # a crash mid-line leaves a partial line: start on a fresh one
            if os.path.exists(path) and os.path.getsize(path):
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    last = f.read(1)
                if last != b"\n":
                    with open(path, "a", encoding="utf-8") as f:
                        f.write("\n")

    def write(self, record: Dict[str, Any]) -> None:
        if not self.path:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_log(path) -> List[Dict[str, Any]]:
    """Step records of a log.jsonl, in step order, the last record of each step (a run resumed from
    an earlier checkpoint re-logs the steps after it); unreadable lines are skipped."""
    by_step: Dict[int, Dict[str, Any]] = {}
    with open(os.fspath(path), encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "step" in rec and "loss" in rec:
                by_step[int(rec["step"])] = rec
    return [by_step[k] for k in sorted(by_step)]


# --------------------------------------------------------------------------- training

def _cosine(total: int, warmup: int = 0):
    def factor(i):
        if i < warmup:
            return (i + 1) / warmup
        span = max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(i - warmup, span) / span))

    return factor


def train_steps(model, sampler, steps: int, lr: float, *, grad_accum: int = 1, weight_decay: float = 0.0,
                max_grad_norm: Optional[float] = 1.0, bf16: bool = False, device=None,
                progress: bool = False, desc: str = "train", warmup_steps: int = 0) -> List[float]:
    """A plain AdamW loop without checkpoints (used for full-precision pre-training): linear warm-up
    over ``warmup_steps``, then cosine decay to zero."""
    if not 0 <= warmup_steps <= steps:
        raise ValueError(f"warmup_steps must be in [0, steps={steps}], got {warmup_steps}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(steps, warmup_steps))
    losses = []
    model.train()
    bar = _bar(steps, 0, desc, progress)
    for _ in range(steps):
        loss = _one_step(model, model, opt, sampler, grad_accum, max_grad_norm, bf16, device)
        sched.step()
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update(1)
    bar.close()
    model.eval()
    return losses


def _bar(total, initial, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)


def _one_step(model, fwd, opt, sampler, grad_accum, max_grad_norm, bf16, device) -> float:
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for _ in range(grad_accum):
        batch = sampler.next_batch()
        if device is not None:
            batch = batch.to(device)
        dev_type = batch.device.type
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16):
            loss = fwd(input_ids=batch, labels=batch).loss
        (loss / grad_accum).backward()
        total += loss.item()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    return total / grad_accum


def run_qat(recipe: QATRecipe, model: Optional[nn.Module] = None, tokenizer=None, train_blocks=None) -> QATResult:
    """Run (or resume) ParetoQ QAT as described in the module docstring.

    ``model`` / ``tokenizer`` / ``train_blocks`` (a ``PackedBlocks``): pass objects to use them
    instead of loading ``recipe.model`` / ``recipe.data`` (the model must be full precision; it is
    quantized and trained in place)."""
    from .distributed import apply_activation_checkpointing, init_from_env, mean_across_ranks, shard_model

    r = recipe
    total = resolve_steps(r)
    info = init_from_env(timeout_s=r.dist_timeout, device=r.device)  # no-op outside torchrun
    sharded = info.distributed
    _check_world_size(r, info.world_size)
    ckpt_format = r.checkpoint_format if r.checkpoint_format != "auto" else ("dcp" if sharded else "safetensors")
    if sharded and ckpt_format != "dcp":
        raise RecipeError("checkpoint_format='safetensors' is for single-process runs; a distributed run saves "
                          "sharded checkpoints with torch.distributed.checkpoint (checkpoint_format='dcp')")
    device = r.device or (str(info.device) if sharded else None)
    out = os.fspath(r.output_dir) if r.output_dir else None
    if out and info.is_main:  # what saves killed by a crash or kill -9 left behind
        for path in serialization.remove_stale_temporaries(out):
            _log.info("removed %s, left by a save that did not finish", path)
    ckpt = latest_checkpoint(out) if out and os.path.isdir(out) else None
    state = None
    if ckpt is not None:
        if not r.resume:
            raise CheckpointError(f"{out} already holds a checkpoint ({ckpt}); resume it or use another output_dir")
        state = _read_state(ckpt)
        _check_settings(ckpt, state, r)  # before any expensive loading

    if model is None:
        if state is not None and r.model == "tiny":
            from .hf import _load_tokenizer

            tokenizer = tokenizer or _load_tokenizer(os.path.join(ckpt, "model"))
            model = tiny_llama(len(tokenizer), seed=r.seed, **r.model_config)
        else:
            model, loaded_tok = _load_base_model(r)
            tokenizer = tokenizer or loaded_tok
    if tokenizer is None and train_blocks is None:
        raise RecipeError("no tokenizer: pass tokenizer= or train_blocks=")
    _fp32_master_weights(model)
    _apply_qat(model, r)
    if device:
        model.to(device)
    if sharded:
        shard_model(model, activation_checkpointing=r.activation_checkpointing)
    elif r.activation_checkpointing:
        apply_activation_checkpointing(model)
    if train_blocks is None:
        train_blocks = build_train_blocks(r, tokenizer)
    sampler = _make_sampler(r, train_blocks, info.rank, info.world_size)

    opt = torch.optim.AdamW(model.parameters(), lr=r.learning_rate, weight_decay=r.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(total))
    step, tokens_seen = 0, 0
    torch.manual_seed(r.seed)
    random.seed(r.seed)
    log = _Log(os.path.join(out, LOG_NAME) if out and info.is_main else None)
    if state is not None:
        _load_checkpoint(model, opt, ckpt, state, sharded)
        sched.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"])
        step, tokens_seen = int(state["step"]), int(state["tokens"])
        log.write({"event": "resume", "step": step, "checkpoint": os.path.basename(ckpt), "time": time.time()})
    else:
        log.write({"event": "start", "settings": r.fingerprint(), "time": time.time()})
    resumed_from = step if state is not None else None

    fwd = torch.compile(model) if r.compile else model
    model.train()
    end = total if r.stop_after is None else min(total, max(step, r.stop_after))
    losses: List[float] = []
    bar = _bar(total, step, f"QAT {r.bits}-bit", r.progress and info.is_main)
    t_last = time.perf_counter()
    last_saved = step if state is not None else None

    def save(step):
        if ckpt_format == "dcp":
            return _save_checkpoint_dcp(out, step, model, tokenizer, opt, sched, sampler, r, tokens_seen,
                                        info.world_size)
        return _save_checkpoint(out, step, model, tokenizer, opt, sched, sampler, r, tokens_seen)

    while step < end:
        try:
            loss = _one_step(model, fwd, opt, sampler, r.grad_accum, r.max_grad_norm, r.bf16, device)
            if sharded:
                loss = mean_across_ranks(loss)
        except RuntimeError as e:  # a peer died, or hung past dist_timeout
            if not (sharded and _is_comm_error(e)):
                raise
            last = latest_checkpoint(out) if out and os.path.isdir(out) else None
            raise CheckpointError(f"rank {info.rank} lost contact with the other ranks in step {step + 1} "
                                  f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
                                  f"; another rank probably died (torchrun names it). The last complete "
                                  f"checkpoint is {last or 'none'}; re-run the same command to resume") from e
        lr = opt.param_groups[0]["lr"]
        sched.step()
        step += 1
        tokens_seen += r.tokens_per_step
        now = time.perf_counter()
        tps = r.tokens_per_step / max(now - t_last, 1e-9)
        t_last = now
        losses.append(loss)
        log.write({"step": step, "loss": loss, "lr": lr, "tokens": tokens_seen, "tokens_per_s": tps,
                   "time": time.time()})
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
        bar.update(1)
        if out and ((r.save_every and step % r.save_every == 0) or step == end):
            ckpt = save(step)
            last_saved = step
    bar.close()
    if out and last_saved != step:  # nothing to run (already finished): make sure a checkpoint names it
        ckpt = save(step)
    model.eval()
    return QATResult(model=model, tokenizer=tokenizer, steps=step, total_steps=total, tokens=tokens_seen,
                     losses=losses, checkpoint=ckpt, log_path=log.path, resumed_from=resumed_from)


def qat(model: str = "tiny", bits=2, **kwargs) -> QATResult:
    """Shorthand: ``run_qat(QATRecipe(model=model, bits=bits, **kwargs))``."""
    return run_qat(QATRecipe(model=model, bits=bits, **kwargs))


# --------------------------------------------------------------------------- convert

def resolve_qat_checkpoint(path) -> str:
    """A QAT model folder from: a run's output_dir (its latest checkpoint), a checkpoint-N folder,
    or a folder written by ``hf.save_qat_checkpoint``."""
    from .hf import QAT_NAME

    p = os.fspath(path)
    if not os.path.exists(p):
        raise CheckpointError(f"no such checkpoint folder {p!r}")
    if os.path.isfile(os.path.join(p, QAT_NAME)):
        return p
    if os.path.isfile(os.path.join(p, "model", QAT_NAME)):
        return os.path.join(p, "model")
    latest = latest_checkpoint(p) if os.path.isdir(p) else None
    if latest and os.path.isfile(os.path.join(latest, "model", QAT_NAME)):
        return os.path.join(latest, "model")
    raise CheckpointError(f"{p!r} is not a ParetoQ QAT checkpoint (no {QAT_NAME}, no checkpoint-*/ named by "
                          f"'{LATEST_NAME}')")


def to_packed(model: nn.Module) -> nn.Module:
    """Convert every QAT layer of ``model`` in place to packed weights at its own bits/group size."""
    from torchao import quantize_

    from .hf import qat_modules
    from .packed import ParetoQWeightOnlyConfig

    groups: Dict[tuple, set] = {}
    for name, fmt in qat_modules(model).items():
        groups.setdefault((fmt["bits"], fmt["group_size"]), set()).add(name)
    if not groups:
        raise RecipeError("the model has no ParetoQ QAT layers to convert")
    for (bits, gs), names in groups.items():
        quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=gs),
                  filter_fn=lambda m, fqn, s=names: fqn in s)
    return model


def convert_checkpoint(src, out_dir) -> nn.Module:
    """QAT checkpoint (see ``resolve_qat_checkpoint``) -> packed Hugging Face folder ``out_dir``."""
    from .hf import load_qat_checkpoint, save_quantized

    folder = resolve_qat_checkpoint(src)
    model, tok = load_qat_checkpoint(folder)
    to_packed(model)
    model.eval()
    save_quantized(model, tok, out_dir)
    return model


# --------------------------------------------------------------------------- demo

@dataclass
class DemoRow:
    label: str  # "full precision", "ParetoQ QAT", "RTN"
    bits: Optional[float]
    model_mb: float  # stored bytes of the whole model / 1e6
    linear_mb: float  # stored bytes of the block linears (packed codes + scales) / 1e6
    ppl: float


def _size_mb(model) -> tuple:
    from .size import model_size

    rep = model_size(model)
    lin = sum(l.total_bytes for l in rep.layers if l.bits is not None)
    return rep.total_bytes / 1e6, lin / 1e6


def plot_pareto(rows: List[DemoRow], path, title: str = "ParetoQ: size vs held-out perplexity") -> str:
    """Write a size-vs-perplexity plot (PNG, matplotlib Agg backend) atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    for label, marker in (("ParetoQ QAT", "o-"), ("RTN", "s--")):
        pts = sorted((r.linear_mb, r.ppl, r.bits) for r in rows if r.label == label)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=label)
            for x, y, b in pts:
                ax.annotate(f"{b:g}b", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for r in rows:
        if r.label == "full precision":
            ax.plot([r.linear_mb], [r.ppl], "k*", markersize=12, label="full precision")
    ax.set_xlabel("stored size of the quantized linear layers (MB, codes + scales)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        serialization.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return os.fspath(path)


def format_table(rows: List[DemoRow]) -> str:
    head = f"{'model':<16}{'bits':>6}{'model MB':>11}{'linears MB':>12}{'held-out ppl':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        bits = "32" if r.bits is None else f"{r.bits:g}"
        lines.append(f"{r.label:<16}{bits:>6}{r.model_mb:>11.3f}{r.linear_mb:>12.3f}{r.ppl:>14.2f}")
    return "\n".join(lines)


def demo(*, bits_list=(4, 3, 2, 1.58, 1), pretrain_steps: int = 400, qat_fraction: float = 0.1,
         batch_size: int = 16, block_size: int = 128, vocab_size: int = 1024, max_chars: int = 1_500_000,
         val_chars: int = 200_000, eval_blocks: int = 64, model_config: Optional[Dict[str, Any]] = None,
         pretrain_lr: float = 3e-3, lr_scale: float = 10.0, group_size: Optional[int] = None, seed: int = 0,
         out_dir: Optional[str] = "paretoq-demo", save_models: bool = False, progress: bool = True,
         log=print) -> Dict[str, Any]:
    """The ParetoQ workflow on a small model, offline: pre-train a small Llama on the standard
    library's sources in full precision, then for each bit width run QAT with ``qat_fraction`` of
    the pre-training tokens (paper: 10 %), convert to packed weights, and measure stored size and
    held-out perplexity next to round-to-nearest PTQ at the same bits.

    The QAT LR is the paper's LR times ``lr_scale``: the paper's 2e-5 / 1e-5 are for billion-parameter
    models trained for ~10B tokens; a tiny model trained for seconds needs a larger step.
    Returns {"rows": [DemoRow], "table": str, "plot": path or None, "seconds": float}."""
    import copy

    from torchao import quantize_

    from .data import PackedBlocks, load_texts, tokenize, train_tokenizer
    from .evaluate import perplexity
    from .packed import ParetoQWeightOnlyConfig

    t0 = time.time()
    torch.manual_seed(seed)
    texts = load_texts("stdlib", "train", max_chars=max_chars)
    tok = train_tokenizer(texts, vocab_size)
    train_blocks = PackedBlocks(tokenize(texts, tok), block_size, source="stdlib[train]")
    val_texts = load_texts("stdlib", "validation", max_chars=val_chars)
    val_blocks = PackedBlocks(tokenize(val_texts, tok), block_size, source="stdlib[validation]")
    val = val_blocks.blocks[:eval_blocks]
    r0 = QATRecipe(block_size=block_size, batch_size=batch_size, steps=1)  # validates sizes
    sampler = _make_sampler(r0, train_blocks)
    fp = tiny_llama(len(tok), seed=seed, **(model_config or {}))
    log(f"demo: {sum(p.numel() for p in fp.parameters()):,} parameters, {len(train_blocks)} training blocks "
        f"of {block_size} tokens, {val.shape[0]} held-out blocks")
    # 7 % linear warm-up: without it LR 3e-3 diverges early on wider models (benchmarks/pareto_study.py sweep)
    train_steps(fp, sampler, pretrain_steps, pretrain_lr, progress=progress, desc="pre-train FP",
                warmup_steps=pretrain_steps * 7 // 100)
    pre_tokens = pretrain_steps * batch_size * block_size
    fp_mb, fp_lin = _size_mb_fp(fp)
    rows = [DemoRow("full precision", None, fp_mb, fp_lin, perplexity(fp, val)["ppl"])]
    log(f"pre-trained: {pretrain_steps} steps, {pre_tokens:,} tokens, ppl {rows[0].ppl:.2f} "
        f"({time.time() - t0:.0f}s)")
    for bits in bits_list:
        rtn = copy.deepcopy(fp)
        quantize_(rtn, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size))
        rtn_row = DemoRow("RTN", get_format(bits).bits, *_size_mb(rtn), perplexity(rtn, val)["ppl"])
        del rtn
        model = copy.deepcopy(fp)
        r = QATRecipe(model="<demo>", bits=bits, group_size=group_size, block_size=block_size,
                      batch_size=batch_size, pretrain_tokens=pre_tokens, token_fraction=qat_fraction,
                      lr=paper_lr(bits) * lr_scale, seed=seed + 1, output_dir=None, progress=progress)
        res = run_qat(r, model=model, tokenizer=tok, train_blocks=train_blocks)
        to_packed(model)  # convert: packed low-bit codes + learned scales
        if save_models and out_dir:
            from .hf import save_quantized

            save_quantized(model, tok, os.path.join(out_dir, f"paretoq-{get_format(bits).bits:g}bit"))
        rows.append(DemoRow("ParetoQ QAT", get_format(bits).bits, *_size_mb(model), perplexity(model, val)["ppl"]))
        rows.append(rtn_row)
        log(f"{bits:g}-bit: QAT {res.steps} steps ({res.tokens:,} tokens), ppl {rows[-2].ppl:.2f}; "
            f"RTN ppl {rtn_row.ppl:.2f} ({time.time() - t0:.0f}s)")
    table = format_table(rows)
    plot = files = None
    seconds = time.time() - t0
    if out_dir:
        plot = plot_pareto(rows, os.path.join(out_dir, "pareto.png"))
        files = _write_demo_tables(rows, out_dir, dict(
            bits=[get_format(b).bits for b in bits_list], pretrain_steps=pretrain_steps, qat_fraction=qat_fraction,
            batch_size=batch_size, block_size=block_size, vocab_size=vocab_size, group_size=group_size,
            lr_scale=lr_scale, seed=seed, model_config=dict(model_config or {}), seconds=round(seconds, 1)))
    return {"rows": rows, "table": table, "plot": plot, "files": files, "seconds": seconds}


def _write_demo_tables(rows: List[DemoRow], out_dir: str, settings: Dict[str, Any]) -> List[str]:
    """``pareto.md`` (the table) and ``pareto.json`` (rows + settings) next to the plot, atomically."""
    md = ["| model | bits | model MB | linears MB | held-out ppl |", "|---|---|---|---|---|"]
    md += [f"| {r.label} | {'32' if r.bits is None else f'{r.bits:g}'} | {r.model_mb:.3f} | {r.linear_mb:.3f} | "
           f"{r.ppl:.2f} |" for r in rows]
    md += ["", "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items())]
    doc = {"rows": [dataclasses.asdict(r) for r in rows], "settings": settings}
    paths = [os.path.join(out_dir, "pareto.md"), os.path.join(out_dir, "pareto.json")]
    for path, text in zip(paths, ("\n".join(md) + "\n", json.dumps(doc, indent=1) + "\n")):
        serialization.atomic_write(path, lambda p, t=text: _write_text(p, t))
    return paths


def _size_mb_fp(model) -> tuple:
    """Whole-model MB and the MB of the layers the default filter would quantize, in full precision."""
    from .size import model_size
    from ._targets import output_head_names

    rep = model_size(model)
    heads = output_head_names(model)
    lin = sum(l.total_bytes for l in rep.layers if l.name not in heads)
    return rep.total_bytes / 1e6, lin / 1e6
