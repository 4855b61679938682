"""The QAT training loop: ``run_qat`` (see ``paretoq_ao.workflow.recipe`` for what it does)."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass
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


def _one_step(model, fwd, opt, sampler, grad_accum, max_grad_norm, bf16, device, teacher=None) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; ``teacher``: a ``distill.Teacher``
    (the loss mixes its KL with the cross-entropy)."""
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for _ in range(grad_accum):
        batch = sampler.next_batch()
        if device is not None:
            batch = batch.to(device)
        dev_type = batch.device.type
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16):
            # KL only (weight 1): the student's cross-entropy is not computed
            # use_cache=False: a training step has no later tokens (a KV cache is built for nothing,
            # and under torch.compile each layer's cache update is traced too)
            out = fwd(input_ids=batch, labels=batch if teacher is None or teacher.needs_ce else None, use_cache=False)
            loss = out.loss if teacher is None else teacher.loss(out, batch)
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
    from .distributed import init_from_env

    r = recipe
    total = resolve_steps(r)
    info = init_from_env(timeout_s=r.dist_timeout, device=r.device)  # no-op outside torchrun
    run = _open_run(r, info)
    model, tokenizer, teacher = _prepare_model(run, model, tokenizer, need_tokenizer=train_blocks is None)
    if train_blocks is None:
        train_blocks = build_train_blocks(r, tokenizer)
    sampler = _make_sampler(r, train_blocks, info.rank, info.world_size)
    opt = torch.optim.AdamW(model.parameters(), lr=r.learning_rate, weight_decay=r.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(total))
    torch.manual_seed(r.seed)
    random.seed(r.seed)
    loop = _Loop(run, model, tokenizer, opt, sched, sampler, total, teacher)
    loop.start_or_resume()
    loop.train()
    model.eval()
    return QATResult(model=model, tokenizer=tokenizer, steps=loop.step, total_steps=total, tokens=loop.tokens_seen,
                     losses=loop.losses, checkpoint=loop.ckpt, log_path=loop.log.path,
                     resumed_from=loop.resumed_from)


@dataclass
class _Run:
    """Where a QAT run writes and what it resumes: settled before any model is loaded."""
    recipe: QATRecipe
    info: object  # distributed.DistInfo
    out: Optional[str]
    ckpt_format: str
    device: Optional[str]
    ckpt: Optional[str]  # the checkpoint to resume, if any
    state: Optional[dict]  # its training state


def _open_run(r: QATRecipe, info) -> _Run:
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
    return _Run(r, info, out, ckpt_format, device, ckpt, state)


def _prepare_model(run: _Run, model, tokenizer, need_tokenizer: bool):
    """The model to train (loaded unless given), QAT applied, moved, sharded / checkpointed; and
    the distillation teacher (None unless ``recipe.distill``), taken before QAT."""
    from .distributed import apply_activation_checkpointing, shard_model

    r = run.recipe
    if model is None:
        if run.state is not None and r.model == "tiny":
            from .hf import _load_tokenizer

            tokenizer = tokenizer or _load_tokenizer(os.path.join(run.ckpt, "model"))
            model = tiny_llama(len(tokenizer), seed=r.seed, **r.model_config)
        else:
            model, loaded_tok = _load_base_model(r)
            tokenizer = tokenizer or loaded_tok
    if tokenizer is None and need_tokenizer:
        raise RecipeError("no tokenizer: pass tokenizer= or train_blocks=")
    _fp32_master_weights(model)
    teacher = _make_teacher(run, model)
    _apply_qat(model, r)
    if run.device:
        model.to(run.device)
        if teacher is not None:
            teacher.module.to(run.device)
    if run.info.distributed:
        shard_model(model, activation_checkpointing=r.activation_checkpointing)
        if teacher is not None:
            shard_model(teacher.module, activation_checkpointing=False)  # sharded like the student
    elif r.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model, tokenizer, teacher


def _make_teacher(run: _Run, model):
    """The frozen full-precision teacher, checked against the one a resumed run started with."""
    from .distill import make_teacher

    r = run.recipe
    if not r.distill:
        return None
    teacher = make_teacher(model, r.distill_temperature, r.distill_weight, r.bf16)
    saved = (run.state or {}).get("teacher")
    if run.state is not None and saved != teacher.digest:
        raise CheckpointError(f"{run.ckpt}: the distillation teacher (the model this QAT starts from, digest "
                              f"{teacher.digest[:12]}) differs from the one this run was started with "
                              f"({str(saved)[:12]}); resume with the same model, or use another output_dir")
    return teacher


class _Loop:
    """The training loop of one run: steps, logging, checkpoints."""

    def __init__(self, run: _Run, model, tokenizer, opt, sched, sampler, total: int, teacher=None):
        self.run, self.model, self.tokenizer, self.teacher = run, model, tokenizer, teacher
        self.opt, self.sched, self.sampler, self.total = opt, sched, sampler, total
        self.step, self.tokens_seen, self.losses = 0, 0, []
        self.ckpt = run.ckpt
        self.resumed_from = None
        self.last_saved = None
        self.log = _Log(os.path.join(run.out, LOG_NAME) if run.out and run.info.is_main else None)

    def start_or_resume(self) -> None:
        run, state = self.run, self.run.state
        if self.teacher is not None:
            t = self.teacher
            self.log.write({"event": "distill", "temperature": t.temperature, "weight": t.weight,
                            "teacher_mb": t.nbytes / 1e6, "teacher_dtype": str(next(t.module.parameters()).dtype),
                            "digest": t.digest, "time": time.time()})
            _log.info("distillation: teacher %.1f MB (%s), T=%g, weight %g", t.nbytes / 1e6,
                      next(t.module.parameters()).dtype, t.temperature, t.weight)
        if state is None:
            self.log.write({"event": "start", "settings": run.recipe.fingerprint(), "time": time.time()})
            return
        _load_checkpoint(self.model, self.opt, run.ckpt, state, run.info.distributed)
        self.sched.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens"])
        self.resumed_from = self.last_saved = self.step
        self.log.write({"event": "resume", "step": self.step, "checkpoint": os.path.basename(run.ckpt),
                        "time": time.time()})

    def save(self) -> None:
        run, r = self.run, self.run.recipe
        args = (run.out, self.step, self.model, self.tokenizer, self.opt, self.sched, self.sampler, r,
                self.tokens_seen)
        extra = {"teacher": self.teacher.digest} if self.teacher is not None else {}
        if run.ckpt_format == "dcp":
            self.ckpt = _save_checkpoint_dcp(*args, run.info.world_size, extra=extra)
        else:
            self.ckpt = _save_checkpoint(*args, extra=extra)
        self.last_saved = self.step

    def train(self) -> None:
        r, out = self.run.recipe, self.run.out
        fwd = torch.compile(self.model) if r.compile else self.model
        self.model.train()
        end = self.total if r.stop_after is None else min(self.total, max(self.step, r.stop_after))
        bar = _bar(self.total, self.step, f"QAT {r.bits}-bit", r.progress and self.run.info.is_main)
        t_last = time.perf_counter()
        while self.step < end:
            loss = self._one(fwd)
            lr = self.opt.param_groups[0]["lr"]
            self.sched.step()
            self.step += 1
            self.tokens_seen += r.tokens_per_step
            now = time.perf_counter()
            tps = r.tokens_per_step / max(now - t_last, 1e-9)
            t_last = now
            self.losses.append(loss)
            entry = {"step": self.step, "loss": loss, "lr": lr, "tokens": self.tokens_seen,
                     "tokens_per_s": tps, "time": time.time()}
            if self.teacher is not None:  # the teacher's share of this step
                entry["teacher_s"] = self.teacher.take_seconds()
            self.log.write(entry)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
            bar.update(1)
            if out and ((r.save_every and self.step % r.save_every == 0) or self.step == end):
                self.save()
        bar.close()
        if out and self.last_saved != self.step:  # nothing to run (already finished): a checkpoint names it
            self.save()

    def _one(self, fwd) -> float:
        """One optimizer step; a lost peer becomes a CheckpointError naming the checkpoint to resume."""
        from .distributed import mean_across_ranks

        r, run = self.run.recipe, self.run
        try:
            loss = _one_step(self.model, fwd, self.opt, self.sampler, r.grad_accum, r.max_grad_norm, r.bf16,
                             run.device, teacher=self.teacher)
            return mean_across_ranks(loss) if run.info.distributed else loss
        except RuntimeError as e:  # a peer died, or hung past dist_timeout
            if not (run.info.distributed and _is_comm_error(e)):
                raise
            last = latest_checkpoint(run.out) if run.out and os.path.isdir(run.out) else None
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(f"rank {run.info.rank} lost contact with the other ranks in step {self.step + 1} "
                                  f"({type(e).__name__}: {first}); another rank probably died (torchrun names "
                                  f"it). The last complete checkpoint is {last or 'none'}; re-run the same "
                                  "command to resume") from e


def qat(model: str = "tiny", bits=2, **kwargs) -> QATResult:
    """Shorthand: ``run_qat(QATRecipe(model=model, bits=bits, **kwargs))``."""
    return run_qat(QATRecipe(model=model, bits=bits, **kwargs))
