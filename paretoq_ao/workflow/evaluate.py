"""Evaluation: held-out perplexity and zero-shot tasks through lm-eval, on in-memory models.

    from paretoq_ao.evaluate import perplexity, text_perplexity, zero_shot

    perplexity(model, blocks)                       # {"ppl", "loss", "tokens", "blocks"}
    text_perplexity(model, tok, "stdlib")           # the validation split of a data source
    zero_shot(model, tok, ["hellaswag"])            # lm_eval.simple_evaluate(...)["results"]

``zero_shot`` wraps the model object itself (QAT or packed) in lm-eval's Hugging Face wrapper
``HFLM(pretrained=model, tokenizer=tok)``; nothing is saved or reloaded. ``include_path`` points
lm-eval at a folder of task YAML files (local tasks, e.g. ``dataset_path: json`` with
``dataset_kwargs: {data_files: ...}``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["perplexity", "text_perplexity", "zero_shot"]


@torch.no_grad()
def perplexity(model: nn.Module, blocks, batch_size: int = 8, max_blocks: Optional[int] = None,
               device=None) -> Dict[str, float]:
    """Perplexity of ``model`` on ``blocks`` (a ``PackedBlocks`` or an [n, block] int tensor).

    Each block is scored on its own (next-token cross-entropy over its ``block - 1`` predicted
    tokens). Returns ``{"ppl", "loss" (mean nats/token), "tokens" (predicted tokens), "blocks"}``."""
    data = blocks.blocks if hasattr(blocks, "blocks") else torch.as_tensor(blocks)
    if data.dim() != 2 or data.shape[0] == 0 or data.shape[1] < 2:
        raise ValueError(f"perplexity: need at least one block of >= 2 tokens, got shape {tuple(data.shape)}")
    if max_blocks is not None:
        data = data[:max_blocks]
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else "cpu"
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, data.shape[0], batch_size):
            x = data[i: i + batch_size].to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()  # whole blocks: no KV cache
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                   reduction="sum")
            total += loss.item()
            count += x[:, 1:].numel()
    finally:
        model.train(was_training)
    mean = total / count
    return {"ppl": math.exp(mean), "loss": mean, "tokens": count, "blocks": int(data.shape[0])}


def text_perplexity(model: nn.Module, tokenizer, source="stdlib", split: str = "validation",
                    block_size: int = 128, max_chars: Optional[int] = None, text_field: str = "text",
                    batch_size: int = 8, max_blocks: Optional[int] = None) -> Dict[str, float]:
    """Perplexity on ``split`` of a data source (see ``paretoq_ao.data.load_texts``)."""
    from .data import build_blocks

    blocks, _ = build_blocks(source, tokenizer, block_size, split, text_field=text_field, max_chars=max_chars)
    return perplexity(model, blocks, batch_size=batch_size, max_blocks=max_blocks)


def zero_shot(model: nn.Module, tokenizer, tasks: Union[str, Sequence[str]], *,
              include_path: Optional[str] = None, num_fewshot: Optional[int] = None,
              limit: Optional[Union[int, float]] = None, batch_size: int = 1,
              max_length: Optional[int] = None, full_output: bool = False, **kwargs) -> Dict[str, Any]:
    """Run lm-eval tasks on the in-memory ``model`` (``HFLM(pretrained=model, tokenizer=...)``).

    Returns lm-eval's ``results`` dict ({task: {"acc,none": ..., ...}}), or the whole output of
    ``lm_eval.simple_evaluate`` when ``full_output``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if not tasks:
        raise ValueError("zero_shot: no tasks given")
    tm = TaskManager(include_path=include_path) if include_path else TaskManager()
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"zero_shot: unknown lm-eval task(s) {unknown}"
                         + (f" (also looked in {include_path})" if include_path else ""))
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=tm, log_samples=False, **kwargs)
    finally:
        model.train(was_training)
    return out if full_output else out["results"]
