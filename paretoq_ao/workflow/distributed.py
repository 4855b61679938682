"""QAT beyond one device, on PyTorch's own stack: FSDP2 (``fully_shard``), torchrun, and
``torch.distributed.checkpoint`` (DCP).

    from paretoq_ao.distributed import init_from_env, shard_model

    info = init_from_env()                 # under torchrun: the process group from RANK/WORLD_SIZE
    paretoq_ao.quantize(model, ParetoQQATConfig(bits=2))
    shard_model(model, activation_checkpointing=True)   # FSDP2 per transformer block + the root
    opt = torch.optim.AdamW(model.parameters(), ...)     # optimizer state is sharded like the params

How the QAT weight survives sharding. On one device a QAT layer's weight is a
``ParetoQQATWeight`` whose ``F.linear`` fake-quantizes itself with ``module.weight_scale``.
``fully_shard`` replaces every parameter by a plain DTensor shard and, before each forward, by the
all-gathered plain tensor, so the subclass cannot travel through FSDP. ``prepare_for_fsdp`` therefore
turns each QAT layer into a ``ParetoQQATLinear`` first: the same module (same parameters ``weight``
and ``weight_scale``, same buffer ``weight_qat_format``, same state-dict keys), whose class
fake-quantizes in ``forward`` with the same autograd function. FSDP then shards the latent weight
and the scale along dim 0 (uneven sizes are padded by FSDP), all-gathers both for the forward, and
reduce-scatters both gradients; the fake-quantization sees the whole weight, so its gradients are
the single-device ones. Calling ``fully_shard`` on a QAT model without ``prepare_for_fsdp`` is caught
at the first forward (the QAT layer finds a plain weight) with an error that says what to call.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DistInfo", "init_from_env", "launched_by_torchrun", "world_info", "ParetoQQATLinear",
    "prepare_for_fsdp", "find_blocks", "apply_activation_checkpointing", "shard_model",
    "all_ok", "mean_across_ranks",
]


# --------------------------------------------------------------------------- process group

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return group_is_up()


def launched_by_torchrun() -> bool:
    """True inside a process started by ``torchrun`` (or any launcher that sets RANK/WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def group_is_up() -> bool:
    """True when a default process group exists in this process."""
    return dist.is_available() and dist.is_initialized()


def world_info(device: Optional[str] = None) -> DistInfo:
    """Rank, world size and device of this process (rank 0 of 1 when not distributed)."""
    if not group_is_up():
        return DistInfo(device=torch.device(device) if device else torch.device("cpu"))
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if device:
        dev = torch.device(device)
    elif dist.get_backend() == "nccl":
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev)


def init_from_env(backend: Optional[str] = None, timeout_s: float = 600.0,
                  device: Optional[str] = None) -> DistInfo:
    """Join the process group described by torchrun's environment (idempotent).

    ``backend`` defaults to NCCL when CUDA is available and gloo otherwise. ``timeout_s`` bounds
    every collective, so a rank that hangs (rather than dies: torchrun stops the job when a rank
    dies) fails the job instead of blocking it forever. Outside torchrun this does nothing and
    returns rank 0 of 1."""
    if group_is_up():
        return world_info(device)
    if not launched_by_torchrun():
        return world_info(device)
    if not dist.is_available():  # pragma: no cover
        raise RuntimeError("this PyTorch build has no torch.distributed; cannot run under torchrun")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and (device is None or "cuda" in device) else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return world_info(device)


def all_ok(ok: bool) -> bool:
    """True on every rank when ``ok`` is true on every rank (one all-reduce; no-op when alone)."""
    if not group_is_up():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def from_main(obj):
    """Rank 0's ``obj`` on every rank (a picklable value; no-op when alone)."""
    if not group_is_up():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def mean_across_ranks(value: float) -> float:
    if not group_is_up():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------- FSDP2

class ParetoQQATLinear(nn.Linear):
    """A QAT ``nn.Linear`` whose forward fake-quantizes ``weight`` with ``weight_scale``.

    Made by ``prepare_for_fsdp`` from a layer holding a ``ParetoQQATWeight``: parameters, buffers
    and state-dict keys are unchanged, only the class differs (as FSDP's own ``FSDPLinear`` does)."""

    _paretoq_bits: float

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        from ..quant import _FakeQuantize

        wq = _FakeQuantize.apply(self.weight, self.weight_scale, self._paretoq_bits)
        return F.linear(input, wq.to(input.dtype), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", paretoq_bits={self._paretoq_bits:g}"


def prepare_for_fsdp(model: nn.Module) -> List[str]:
    """Make every ParetoQ QAT layer of ``model`` a ``ParetoQQATLinear`` (see the module doc), in
    place; returns their names. Call it after ``paretoq_ao.quantize(model, ParetoQQATConfig(...))`` and before
    ``fully_shard`` (``shard_model`` does). Idempotent."""
    from ..qat import ParetoQQATWeight, remove_qat_guard

    names, problems = [], []
    for name, mod in model.named_modules():
        w = mod._parameters.get("weight") if hasattr(mod, "_parameters") else None
        if isinstance(mod, ParetoQQATLinear):
            names.append(name)
            continue
        if not isinstance(w, ParetoQQATWeight):
            continue
        if type(mod) is not nn.Linear:  # its class (forward, methods) would be lost by the swap
            problems.append(f"{name or '<root>'}: a {type(mod).__name__}, not a plain nn.Linear; only plain "
                            "nn.Linear QAT layers can become ParetoQQATLinear for sharding")
    if problems:
        raise ValueError("prepare_for_fsdp: cannot prepare these QAT layers:\n  " + "\n  ".join(problems))
    seen = {}
    for name, mod in model.named_modules():
        w = mod._parameters.get("weight")
        if not isinstance(w, ParetoQQATWeight):
            continue
        if id(w) in seen:
            raise ValueError(f"prepare_for_fsdp: layers {seen[id(w)]!r} and {name!r} share one QAT weight; "
                             "FSDP cannot shard a weight shared across QAT layers")
        seen[id(w)] = name
    for name, mod in model.named_modules():
        w = mod._parameters.get("weight")
        if not isinstance(w, ParetoQQATWeight):
            continue
        with torch._C.DisableTorchFunctionSubclass():
            plain = nn.Parameter(w.detach(), requires_grad=w.requires_grad)
        mod._parameters["weight"] = plain
        remove_qat_guard(mod)
        mod.__class__ = ParetoQQATLinear
        mod._paretoq_bits = w.bits
        names.append(name)
    return names


def find_blocks(model: nn.Module) -> List[nn.Module]:
    """The repeated transformer blocks: the children of the largest ``nn.ModuleList`` whose members
    all have one class (``model.model.layers`` for Hugging Face decoders); [] when there is none."""
    best: List[nn.Module] = []
    best_params = -1
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(c) for c in mod}) == 1:
            n = sum(p.numel() for p in mod.parameters())
            if n > best_params:
                best, best_params = list(mod), n
    return best


def apply_activation_checkpointing(model: nn.Module, blocks: Optional[Iterable[nn.Module]] = None) -> int:
    """Recompute each block's activations in the backward pass instead of storing them
    (``torch.utils.checkpoint``, non-reentrant). Works with and without FSDP; parameter names and
    state-dict keys do not change. Returns how many blocks were wrapped."""
    from torch.utils.checkpoint import checkpoint

    blocks = list(find_blocks(model) if blocks is None else blocks)
    if not blocks:
        raise ValueError(f"activation checkpointing: found no repeated blocks (an nn.ModuleList of one module "
                         f"class) in {type(model).__name__}")
    count = 0
    for block in blocks:
        if getattr(block, "_paretoq_checkpointed", False):
            continue
        inner = type(block).forward

        def forward(self, *args, __inner=inner, **kwargs):
            if torch.is_grad_enabled() and self.training:
                return checkpoint(__inner, self, *args, use_reentrant=False, **kwargs)
            return __inner(self, *args, **kwargs)

        block.__class__ = _checkpointed_class(type(block), forward)
        block._paretoq_checkpointed = True
        count += 1
    return count


_CKPT_CLASSES: dict = {}


def _checkpointed_class(base: type, forward) -> type:
    cls = _CKPT_CLASSES.get(base)
    if cls is None:
        cls = type(f"Checkpointed{base.__name__}", (base,), {"forward": forward})
        _CKPT_CLASSES[base] = cls
    return cls


def shard_model(model: nn.Module, mesh=None, *, reshard_after_forward: bool = True, mp_policy=None,
                activation_checkpointing: bool = False) -> nn.Module:
    """FSDP2 for a (QAT) model, in place: ``prepare_for_fsdp``, optional activation checkpointing,
    ``fully_shard`` on each transformer block (``find_blocks``) and then on the root.

    ``mesh``: a 1-D ``DeviceMesh`` (default: all ranks of the default process group);
    ``mp_policy``: an FSDP ``MixedPrecisionPolicy`` (default: none, parameters and gradients stay
    in their dtype; use bf16 autocast for compute, as the single-device recipe does). The model must
    already be on this rank's device."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not group_is_up() and mesh is None:
        raise RuntimeError("shard_model: no process group; call paretoq_ao.distributed.init_from_env() "
                           "under torchrun (or torch.distributed.init_process_group) first")
    prepare_for_fsdp(model)
    blocks = find_blocks(model)
    if activation_checkpointing:
        apply_activation_checkpointing(model, blocks)
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
              mp_policy=mp_policy if mp_policy is not None else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


# --------------------------------------------------------------------------- checkpoints

def _quiet_single_process(fn, *args, **kwargs):
    import warnings

    with warnings.catch_warnings():  # "assuming the intent is to save/load in a single process": it is
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*single process")
        return fn(*args, **kwargs)


def dcp_save(state, path: str) -> None:
    """``torch.distributed.checkpoint.save`` (collective when a process group exists, else local)."""
    import torch.distributed.checkpoint as dcp

    _quiet_single_process(dcp.save, state, checkpoint_id=path)


def dcp_load(state, path: str) -> None:
    """``torch.distributed.checkpoint.load`` into ``state`` in place, resharding as needed."""
    import torch.distributed.checkpoint as dcp

    _quiet_single_process(dcp.load, state, checkpoint_id=path)


def shutdown() -> None:
    """Tear down the default process group if one is up (what a script ends with after
    ``run_qat`` under torchrun; ``paretoq qat`` calls it when it brought the group up itself).
    Nothing to do otherwise."""
    if group_is_up():
        dist.destroy_process_group()
