"""End-to-end example: ``python -m paretoq_ao.example [--bits 2] [--group-size 32]``.

Builds a small Llama-style model from a config (no download), pre-trains it in full precision on
text every Python installation carries (the standard library's sources, byte-level tokens), runs
ParetoQ QAT with ~10 % extra steps, converts to packed low-bit weights, and prints: that the packed
model reproduces the QAT model's outputs, the stored sizes, and held-out perplexity of the full
precision model, round-to-nearest post-training quantization (RTN) and ParetoQ QAT.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time

import torch

from .. import ParetoQQATConfig, ParetoQWeightOnlyConfig, model_size, quantize
from .evaluate import perplexity as _perplexity
from .models import tiny_llama


def stdlib_bytes(split: str, limit: int) -> torch.Tensor:
    """Byte-level tokens (vocab 256) of the built-in standard-library corpus (paretoq_ao.data)."""
    from .data import load_texts

    data = "\n".join(load_texts("stdlib", split, max_chars=limit)).encode("utf-8")[:limit]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def build_model(seed: int = 0):
    """The recipe's tiny Llama (``tiny_llama``) over byte tokens."""
    return tiny_llama(256, seed=seed, max_position_embeddings=256)


def batches(data: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        yield torch.stack([data[s : s + seq + 1] for s in starts.tolist()])


def train(model, data, steps, lr, seq, batch, seed):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step, tokens in zip(range(steps), batches(data, seq, batch, gen)):
        loss = model(input_ids=tokens, labels=tokens).loss  # the model shifts labels itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return loss.item()


def perplexity(model, data, seq: int = 128) -> float:
    """Held-out perplexity over consecutive ``seq``-token blocks of ``data``."""
    n = len(data) // seq
    return _perplexity(model, data[: n * seq].view(n, seq))["ppl"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=float, default=2, help="1, 1.58, 2, 3 or 4 (default 2)")
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--qat-steps", type=int, default=None, help="default: a quarter of --pretrain-steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    bits = int(args.bits) if float(args.bits).is_integer() else args.bits
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()

    train_data = stdlib_bytes("train", 2_000_000)
    val_data = stdlib_bytes("validation", 32_768)

    model = build_model(args.seed)
    loss = train(model, train_data, args.pretrain_steps, 3e-3, seq=128, batch=16, seed=args.seed)
    fp_ppl = perplexity(model, val_data)
    print(f"pre-trained full precision: {args.pretrain_steps} steps, train loss {loss:.3f}, "
          f"held-out ppl {fp_ppl:.2f}  ({time.time() - t0:.0f}s)")

    rtn = copy.deepcopy(model)
    quantize(rtn, ParetoQWeightOnlyConfig(bits=bits, group_size=args.group_size))
    rtn_ppl = perplexity(rtn, val_data)

    qat_steps = args.qat_steps or max(1, args.pretrain_steps // 4)
    quantize(model, ParetoQQATConfig(bits=bits, group_size=args.group_size))
    loss = train(model, train_data, qat_steps, 1e-3, seq=128, batch=16, seed=args.seed + 1)
    qat_ppl = perplexity(model, val_data)
    probe = val_data[:128].view(1, -1)
    with torch.no_grad():
        qat_logits = model(input_ids=probe).logits
    print(f"ParetoQ QAT at {bits} bits: {qat_steps} steps, train loss {loss:.3f}  ({time.time() - t0:.0f}s)")

    fp_size = model_size(build_model(args.seed))
    quantize(model, ParetoQWeightOnlyConfig(bits=bits, group_size=args.group_size))
    with torch.no_grad():
        packed_logits = model(input_ids=probe).logits
    diff = (packed_logits - qat_logits).abs().max().item()
    print(f"converted: packed logits vs QAT fake-quantized logits, max |diff| = {diff:.2e}")

    size = model_size(model)
    blocks_fp = sum(l.original_bytes for l in size.layers if l.bits is not None)
    blocks_q = size.quantized_bytes
    print(f"block linear weights: {blocks_fp / 1024:.1f} KiB fp32 -> {blocks_q / 1024:.1f} KiB packed "
          f"({8 * blocks_q / (blocks_fp / 4):.2f} bits/weight incl. scales)")
    print(f"whole model: {fp_size.total_bytes / 2**20:.2f} MiB -> {size.total_bytes / 2**20:.2f} MiB "
          f"(embeddings and head kept in full precision)")
    print(f"\n{'model':<28}{'held-out perplexity':>20}")
    print(f"{'full precision':<28}{fp_ppl:>20.2f}")
    print(f"{f'RTN {bits}-bit':<28}{rtn_ppl:>20.2f}")
    print(f"{f'ParetoQ QAT {bits}-bit':<28}{qat_ppl:>20.2f}")
    print("(QAT continues training the pre-trained model, so it has seen more tokens than the\n"
          " full-precision row and can beat it on a model this small and this briefly trained.)")
    print(f"({time.time() - t0:.0f}s total)")
    return {"fp": fp_ppl, "rtn": rtn_ppl, "qat": qat_ppl, "diff": diff}


if __name__ == "__main__":
    main()
