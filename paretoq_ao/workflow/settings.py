"""QAT recipe settings: ``QATRecipe`` (validated fields), ``QATResult``, the paper's learning rates,
the training budget, and the recipe's errors and file names."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..formats import get_format

_log = logging.getLogger(__name__)


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
    "distill_temperature": ("positive", False), "distill_weight": ("unit", False),
}
_KIND_TEXT = {"count": "a whole number >= 1", "whole": "a whole number >= 0", "positive": "a finite number > 0",
              "non_negative": "a finite number >= 0", "fraction": "a number in (0, 1]",
              "seed": "a whole number in [0, 2**63)", "unit": "a number in [0, 1]"}


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
          "fraction": number and 0 < v <= 1, "unit": number and 0 <= v <= 1}[kind]
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
    # distillation from the full-precision model the QAT starts from (workflow/distill.py)
    distill: bool = False
    distill_temperature: float = 1.0
    distill_weight: float = 1.0  # of the KL term; 1 - weight of cross-entropy

    def __post_init__(self):
        self.bits = get_format(self.bits).bits
        for name, (kind, optional) in _FIELD_RANGES.items():
            setattr(self, name, _check_field(name, getattr(self, name), kind, optional))
        if not isinstance(self.model_config, dict):
            raise RecipeError(f"model_config must be a dict of LlamaConfig overrides, got {self.model_config!r}")
        if self.model == "tiny":
            _check_tiny_config(self.model_config)  # before any data is read
        if self.device is not None:
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
            # only when on, so that checkpoints of runs without distillation keep their fingerprint
            **({"distill": [self.distill_temperature, self.distill_weight]} if self.distill else {}),
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


def resolve_device(device: Optional[str] = None) -> torch.device:
    """"cpu" / "cuda" / "cuda:N"; None -> cuda when available, else cpu. Asking for CUDA on a
    machine without it raises a ``ValueError`` that says so."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"device {device!r} requested but CUDA is not available ({why}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev
