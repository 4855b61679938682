"""Run under ``torchrun --nproc_per_node 2`` by tests/test_distributed.py (gloo, CPU).

For every bit width and both scale granularities: a small decoder (odd widths, so FSDP pads its
dim-0 shards) is QAT-converted twice; rank 0 trains one copy alone (the oracle), both ranks train
the other under FSDP2 with each rank holding half of every global batch. Records, per case, the
largest differences in losses, in gradients of latent weights and scales after the first backward,
and in all parameters after the last step, plus facts about the sharding (parameters and optimizer
state are DTensor shards). Then, in the same processes, the ``paretoq`` command line given by
argv[2:] (a ``qat`` run that must refuse to start: tests/test_distributed.py passes a global batch
not divisible by the world size): its exit status and what it printed to stderr. Writes a JSON
report to argv[1] (rank 0).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torchao import quantize_

from paretoq_ao import ParetoQQATConfig
from paretoq_ao.distributed import ParetoQQATLinear, init_from_env, shard_model

VOCAB, DIM, HIDDEN = 50, 24, 45  # 45 rows: uneven shards (23 + 22); groups of 3 divide 24 and 45


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN, bias=True)
        self.down = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block() for _ in range(2)])
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.layers:
            x = b(x)
        return self.head(x)


def loss_fn(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def run_case(bits, group_size, act_ckpt, rank, world, steps=3):
    torch.manual_seed(0)
    base = Net()
    quantize_(base, ParetoQQATConfig(bits=bits, group_size=group_size),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn != "head")
    ref = copy.deepcopy(base)
    model = copy.deepcopy(base)
    shard_model(model, activation_checkpointing=act_ckpt)

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, VOCAB, (4, 9), generator=g) for _ in range(steps)]
    rec = {"loss": 0.0, "grad_weight": 0.0, "grad_scale": 0.0, "param": 0.0, "ref_grad_weight": 0.0,
           "ref_grad_scale": 0.0}
    local = 4 // world
    for i, batch in enumerate(data):
        loss = loss_fn(model, batch[rank * local:(rank + 1) * local])
        loss.backward()
        rloss = loss_fn(ref, batch)
        rloss.backward()
        if i == 0:
            rnamed = dict(ref.named_parameters())
            for name, p in model.named_parameters():
                diff = (full(p.grad) - rnamed[name].grad).abs().max().item()
                key = "grad_scale" if name.endswith("weight_scale") else "grad_weight"
                rec[key] = max(rec[key], diff)
                rec["ref_" + key] = max(rec["ref_" + key], rnamed[name].grad.abs().max().item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        ropt.step()
        opt.zero_grad()
        ropt.zero_grad()
        lt = loss.detach().clone()
        dist.all_reduce(lt)
        rec["loss"] = max(rec["loss"], abs(lt.item() / world - rloss.item()))
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    rsd = ref.state_dict()
    rec["keys_equal"] = sorted(sd) == sorted(rsd)
    rec["param"] = max((sd[k].float() - rsd[k].float()).abs().max().item() for k in rsd)
    # the scales moved (their gradients are not all zero) -- otherwise the comparison proves little
    rec["scale_moved"] = max((rsd[k] - base.state_dict()[k]).abs().max().item() for k in rsd
                             if k.endswith("weight_scale"))
    up = model.layers[0].up
    rec["class"] = type(up).__name__
    rec["is_qat_linear"] = isinstance(up, ParetoQQATLinear)
    rec["weight_local_rows"] = up.weight.to_local().shape[0]
    rec["scale_local_rows"] = up.weight_scale.to_local().shape[0]
    st = opt.state[up.weight]
    rec["optim_state_dtensor"] = isinstance(st["exp_avg"], DTensor)
    rec["optim_state_local_rows"] = st["exp_avg"].to_local().shape[0]
    return rec


def guard_case():
    """fully_shard without prepare_for_fsdp must fail loudly, not train unquantized."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    m = Net()
    quantize_(m, ParetoQQATConfig(bits=2), filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and fqn != "head")
    for b in m.layers:
        fully_shard(b)
    fully_shard(m)
    try:
        m(torch.zeros(1, 3, dtype=torch.long))
    except RuntimeError as e:
        return str(e)
    return None


def cli_case(argv):
    """``paretoq <argv>`` on every rank: its exit status and stderr. (The group was brought up by
    init_from_env before the command, so the command leaves it up; main tears it down.)"""
    from paretoq_ao.cli import main as cli_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli_main(argv)
        except SystemExit as e:
            code = e.code
    return {"code": code, "stderr": err.getvalue()}


def main(out, argv):
    info = init_from_env()
    rank, world = info.rank, info.world_size
    report = {"world_size": world, "cases": {}}
    cases = [(b, None, False) for b in (1, 1.58, 2, 3, 4)] + [(b, 3, False) for b in (1, 1.58, 2, 3, 4)]
    cases += [(2, None, True), (1.58, 3, True)]  # with activation checkpointing
    for bits, gs, ac in cases:
        report["cases"][f"bits={bits} group={gs} ac={ac}"] = run_case(bits, gs, ac, rank, world)
    report["guard"] = guard_case()
    dist.barrier()
    report["cli"] = cli_case(argv)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
