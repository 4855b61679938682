"""Serving: generate text with a packed ParetoQ model through Hugging Face ``model.generate()``.

Import it explicitly (``import paretoq_ao.generate``); ``import paretoq_ao`` never imports it.

    from paretoq_ao.generate import generate

    res = generate("packed-2bit", "def main():", max_new_tokens=64)        # folder from `paretoq convert`
    res = generate(model, "def main():", tokenizer=tok, compile=True, threads=4)   # a loaded model
    print(res.text)
    print(res.summary())   # prefill: 5 tokens in 0.012 s (...); decode: 63 tokens in ...; threads 4, ...

What is measured is the path users take: ``model.generate()`` itself (greedy unless
``do_sample=True``), batch 1, with transformers' default (dynamic) KV cache.

Timing: a ``transformers`` streamer (``_TimingStreamer``, a ``BaseStreamer``) records when
``generate`` hands it the prompt (just before the prefill forward) and when each new token
arrives (``generate`` copies every token to the host before passing it, so on CUDA the clock
waits for the device). ``prefill_s`` = prompt -> first new token (the prefill forward plus
choosing the first token); ``decode_s`` = first new token -> last new token, over
``len(tokens) - 1`` decode tokens. ``total_s`` is the wall time of the whole ``generate`` call.

Compilation (``compile=True``): the model is compiled in place with ``nn.Module.compile(
dynamic=True)`` (its ``__call__``, which ``generate`` calls for every forward), once per model.
Dynamic shapes give one graph for the prefill (any prompt length >= 2) and the decode steps
(growing cache) instead of a recompilation per length. transformers' own auto-compilation
(static cache + ``compile_config``) is not used: it runs only on CUDA/XPU and, for models loaded
through a quantizer, only when the quantizer reports ``is_compileable`` -- the ``"paretoq"``
quantizer does not (``paretoq_ao.hf`` keeps transformers' default ``False``). The first compiled
call includes the compilation, so with ``compile=True`` one warm-up ``generate`` of
``WARMUP_TOKENS`` new tokens on the same prompt runs first (it compiles the prefill graph and
both decode graphs: the first decode step sees the prefill's non-contiguous cache); the reported
times are from the real run after it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

import torch
from torch import nn

from transformers.generation.streamers import BaseStreamer

from . import hf as pq_hf  # registers the "paretoq" quantizer with transformers
from .settings import LATEST_NAME, resolve_device

__all__ = ["GenerationResult", "generate", "load_packed", "resolve_device", "WARMUP_TOKENS"]

WARMUP_TOKENS = 3  # prefill + first decode step + a decode step on the contiguous cache

PathLike = Union[str, os.PathLike]


@dataclass
class GenerationResult:
    """One ``generate`` call: the new text and tokens, and how fast prefill and decode ran."""

    text: str  # the new text only (special tokens skipped)
    tokens: List[int]  # the new token ids
    prompt_tokens: int
    prefill_s: float  # prompt handed over -> first new token
    decode_s: float  # first new token -> last new token
    prefill_tokens_per_s: float  # prompt_tokens / prefill_s
    decode_tokens_per_s: float  # decode_tokens / decode_s (0.0 when there was one new token)
    total_s: float = 0.0  # the whole model.generate() call
    threads: int = 0
    device: str = "cpu"
    compiled: bool = False

    @property
    def decode_tokens(self) -> int:
        """New tokens after the first one (the first comes out of the prefill)."""
        return max(len(self.tokens) - 1, 0)

    def summary(self) -> str:
        return (f"prefill: {self.prompt_tokens} tokens in {self.prefill_s:.3f} s ({self.prefill_tokens_per_s:.1f} "
                f"tok/s); decode: {self.decode_tokens} tokens in {self.decode_s:.2f} s "
                f"({self.decode_tokens_per_s:.1f} tok/s); threads {self.threads}, device {self.device}, "
                f"compiled {'yes' if self.compiled else 'no'}")


class _TimingStreamer(BaseStreamer):
    """Records ``time.perf_counter()`` at each ``put``: the prompt first, then one per new token.
    Forwards everything to ``inner`` (a user's streamer) when given."""

    def __init__(self, inner: Optional[BaseStreamer] = None):
        self.inner = inner
        self.prompt_at: Optional[float] = None
        self.token_at: List[float] = []

    def put(self, value):
        now = time.perf_counter()
        if self.prompt_at is None:
            self.prompt_at = now
        else:
            self.token_at.append(now)
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()


# --------------------------------------------------------------------------- loading

def _check_packed_folder(path: str) -> None:
    """Refuse, naming the fix, anything that is not a folder written by ``save_quantized``."""
    if not os.path.exists(path):
        raise pq_hf.ModelLoadError(f"no such folder {path!r}")
    if not os.path.isdir(path):
        raise pq_hf.ModelLoadError(f"{path!r} is a file; pass the packed model folder (from `paretoq convert`)")
    qat = any(os.path.isfile(os.path.join(path, *p)) for p in
              ((pq_hf.QAT_NAME,), ("model", pq_hf.QAT_NAME), (LATEST_NAME,)))
    if qat:
        raise ValueError(f"{path!r} is a ParetoQ QAT checkpoint, not a packed model; convert it first with "
                         f"`paretoq convert {path} <out-dir>`")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path!r} has no config.json; it is not a packed ParetoQ model folder "
                         f"(write one with `paretoq convert`)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path!r} is not valid JSON ({e.msg})") from None
    qcfg = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
    if method != pq_hf.QUANT_METHOD:
        what = "no quantization_config" if method is None else f"quant_method {method!r}"
        raise ValueError(f"{path!r} is not a packed ParetoQ model (its config.json has {what}); make one from a "
                         f"QAT checkpoint with `paretoq convert`, or with paretoq_ao.quantize(model, "
                         f"ParetoQWeightOnlyConfig(bits=...)) and paretoq_ao.hf.save_quantized")


def load_packed(path: PathLike, device: Optional[str] = None, tokenizer: Any = None) -> Tuple[nn.Module, Any]:
    """Load a packed ParetoQ folder (``paretoq convert`` / ``hf.save_quantized``) and its tokenizer.

    ``tokenizer``: None -> the folder's own tokenizer files; a path or hub id -> loaded with
    ``AutoTokenizer``; anything else is used as is. Returns ``(model in eval mode, tokenizer)``.
    """
    src = os.fspath(path)
    _check_packed_folder(src)
    dev = resolve_device(device)
    model, tok = pq_hf.load_model(src, tokenizer=tokenizer is None)
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    elif tokenizer is not None:
        tok = tokenizer
    if tok is None:
        raise ValueError(f"{src!r} has no tokenizer files; pass a tokenizer (tokenizer=...)")
    model.to(dev)
    return model, tok


# --------------------------------------------------------------------------- generation

def _compile(model: nn.Module) -> None:
    """``nn.Module.compile`` in place (``generate`` calls ``model(...)``), once per model."""
    if getattr(model, "_compiled_call_impl", None) is None:
        model.compile(dynamic=True)


def _check_counts(max_new_tokens, threads) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _prepare(model_or_dir, tokenizer, device) -> Tuple[nn.Module, Any, torch.device]:
    if isinstance(model_or_dir, (str, os.PathLike)):
        model, tok = load_packed(model_or_dir, device, tokenizer)
        return model, tok, _model_device(model)
    model = model_or_dir
    if not hasattr(model, "generate"):
        raise TypeError(f"generate: expected a packed folder or a transformers causal LM, got {type(model).__name__}")
    if tokenizer is None:
        raise ValueError("generate: pass tokenizer=... with an already-loaded model")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    if device is not None:
        model.to(resolve_device(device))
    model.eval()
    return model, tokenizer, _model_device(model)


def _result(streamer: _TimingStreamer, new: List[int], n_prompt: int, total_s: float, tok) -> GenerationResult:
    first = streamer.token_at[0] if streamer.token_at else streamer.prompt_at
    prefill_s = first - streamer.prompt_at
    decode_s = streamer.token_at[-1] - first if streamer.token_at else 0.0
    n_decode = max(len(new) - 1, 0)
    return GenerationResult(
        text=tok.decode(new, skip_special_tokens=True), tokens=new, prompt_tokens=n_prompt,
        prefill_s=prefill_s, decode_s=decode_s,
        prefill_tokens_per_s=n_prompt / prefill_s if prefill_s > 0 else 0.0,
        decode_tokens_per_s=n_decode / decode_s if n_decode and decode_s > 0 else 0.0,
        total_s=total_s)


def generate(model_or_dir: Union[PathLike, nn.Module], prompt: str, max_new_tokens: int = 64, *,
             tokenizer: Any = None, compile: bool = False, threads: Optional[int] = None,
             device: Optional[str] = None, do_sample: bool = False, **generate_kwargs) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after ``prompt`` with ``model.generate()`` and time it.

    ``model_or_dir``: a packed ParetoQ folder (``paretoq convert`` / ``hf.save_quantized``; loaded
    with its tokenizer unless ``tokenizer`` is given), or an already-loaded causal LM (packed or
    not) with ``tokenizer``. ``device``: "cpu" or "cuda"; default for a folder: cuda when
    available, else cpu; a loaded model stays where it is unless ``device`` is given (then it is
    moved in place). ``threads``: ``torch.set_num_threads`` for this call (restored afterwards).
    ``compile``: compile the model in place (see the module docstring); the first compiled call
    includes the compilation, so one warm-up generate of ``WARMUP_TOKENS`` tokens runs first and
    the times reported are from the real run. Greedy unless ``do_sample=True``; other keyword
    arguments go to ``model.generate`` (a ``streamer`` there still receives every token).
    Generation may stop early at the EOS token, so ``tokens`` can be shorter than
    ``max_new_tokens``.
    """
    _check_counts(max_new_tokens, threads)
    model, tok, dev = _prepare(model_or_dir, tokenizer, device)
    enc = tok(prompt, return_tensors="pt")
    n_prompt = int(enc["input_ids"].shape[1])
    if n_prompt == 0:
        raise ValueError(f"the prompt {prompt!r} encodes to no tokens")
    enc = {k: v.to(dev) for k, v in enc.items()}
    kw = dict(generate_kwargs, do_sample=do_sample)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is not None:
            kw.setdefault("pad_token_id", pad)
    user_streamer = kw.pop("streamer", None)
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        # inference_mode, not generate()'s own no_grad: no autograd dispatch layer around each op, which
        # for the ParetoQ custom ops is a Python kernel (about 20 us of every linear call on a CPU)
        with torch.inference_mode():
            if compile:
                _compile(model)
                warm = min(WARMUP_TOKENS, max_new_tokens)
                model.generate(**enc, **dict(kw, max_new_tokens=warm, min_new_tokens=warm))
            streamer = _TimingStreamer(user_streamer)
            start = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=max_new_tokens, streamer=streamer, **kw)
            total_s = time.perf_counter() - start
        used_threads = torch.get_num_threads()
    finally:
        if threads is not None:
            torch.set_num_threads(before)
    seq = out.sequences if hasattr(out, "sequences") else out
    res = _result(streamer, seq[0, n_prompt:].tolist(), n_prompt, total_s, tok)
    res.threads, res.device, res.compiled = used_threads, str(dev), bool(compile)
    return res
