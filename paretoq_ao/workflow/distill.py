"""Distillation from the full-precision model the QAT starts from: ``QATRecipe(distill=True)``,
``paretoq qat --distill [--distill-temperature T] [--distill-weight w]``.

The teacher is a frozen copy of the model as loaded, taken before QAT changes it (loaded once; bf16
when the run computes in bf16, else float32; no gradients; sharded like the student under FSDP2).
Each micro-batch's loss is

    loss = w * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - w) * cross-entropy

with the KL averaged over the positions whose next token the cross-entropy predicts (every position
but the last of a block), computed in float32. ``w = 0`` gives plain QAT bit for bit (the KL term is
still computed, times zero). The teacher is not checkpointed: its digest (``teacher_digest``: SHA-256
of every parameter's name, shape, dtype and bytes) is stored in each checkpoint's trainer state and a
resume with another teacher is refused. The teacher's memory and its share of the step time are
logged (``log.jsonl`` events ``distill`` and per-step ``teacher_s``).
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["distill_loss", "Teacher", "make_teacher", "teacher_digest"]


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` at temperature ``T``, mean over the predicted positions
    (``[:, :-1]`` of ``[batch, seq, vocab]`` logits), in float32."""
    s = (student_logits[:, :-1].float() / temperature).flatten(0, 1)
    with torch.no_grad():  # KL = H(p_t, p_s) - H(p_t); the teacher's entropy carries no gradient
        t = F.log_softmax((teacher_logits[:, :-1].float() / temperature).flatten(0, 1), dim=-1)
        p = t.exp()
        entropy = -(p * t).sum(-1).mean()
    # the fused soft-target cross-entropy: one log-softmax of the student, as for the CE loss
    return (F.cross_entropy(s, p) - entropy) * (temperature * temperature)


def teacher_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer: name, shape, dtype and bytes (recorded in checkpoints)."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        data = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(data.shape)}:{data.dtype};".encode())
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


@dataclass
class Teacher:
    module: nn.Module
    temperature: float
    weight: float
    digest: str
    seconds: float = 0.0  # time in the teacher's forward since the last ``take_seconds``

    @property
    def needs_ce(self) -> bool:
        """Whether the loss uses the student's cross-entropy (not at weight 1: KL only)."""
        return self.weight != 1.0

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    def loss(self, out, batch: torch.Tensor) -> torch.Tensor:
        """The mixed loss of one micro-batch, from the student's output ``out`` (logits and CE)."""
        t0 = time.perf_counter()
        with torch.no_grad():
            t_logits = self.module(input_ids=batch, use_cache=False).logits
        self.seconds += time.perf_counter() - t0
        kl = distill_loss(out.logits, t_logits, self.temperature)
        if not self.needs_ce:  # the caller did not ask the student for its cross-entropy
            return kl
        return self.weight * kl + (1.0 - self.weight) * out.loss

    def take_seconds(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s


def make_teacher(model: nn.Module, temperature: float, weight: float, bf16: bool) -> Teacher:
    """A frozen copy of ``model`` as it is now (call before QAT is applied)."""
    module = copy.deepcopy(model)
    module.eval()
    module.requires_grad_(False)
    digest = teacher_digest(module)  # of the weights as loaded, before any dtype change
    if bf16:
        module.to(torch.bfloat16)
    return Teacher(module, temperature, weight, digest)
