"""The QAT training loop: ``run_qat`` (see ``paretoq_ao.workflow.recipe`` for what it does)."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from typing import List, Optional

import torch
from torch import nn

from .. import serialization
from .checkpoints import (
    _check_settings, _is_comm_error, _load_checkpoint, _Log, _read_state, _save_checkpoint, _save_checkpoint_dcp,
    _set_rng_state, latest_checkpoint,
)
from .models import (
    _apply_qat, _check_world_size, _fp32_master_weights, _load_base_model, _make_sampler, build_train_blocks,
    tiny_llama,
)
from .settings import CheckpointError, LOG_NAME, QATRecipe, QATResult, RecipeError, resolve_steps

_log = logging.getLogger(__name__)

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
