#!/usr/bin/env python
"""End-to-end batch-1 decode benchmark: bf16 vs torchao int4 weight-only vs ParetoQ 4/3/2/1.58/1-bit.

    python benchmarks/bench_decode.py                                   # Llama-3-8B shape, all variants
    python benchmarks/bench_decode.py --variants bf16,int4 --results-dir /tmp/r
    python benchmarks/bench_decode.py --variants paretoq --bits 2,1.58 --merge benchmarks/results/X.json
    python benchmarks/bench_decode.py --tiny                             # quick GPU check of the flow
    python benchmarks/bench_decode.py --device cpu --tiny                # CPU smoke test (what the test runs)

The model
---------
A minimal gpt-fast-style Llama decoder written here (``Transformer`` in ``_decode_model.py``), not
transformers' ``LlamaForCausalLM``: it is the model family behind torchao's published decode figures
(``torchao/_models/llama``, gpt-fast), it has a static KV cache that ``torch.compile`` captures
with ``fullgraph=True`` and CUDA graphs without any cache API of transformers (whose static-cache
API has changed between 5.x releases), and it keeps the benchmark independent of the
transformers version. Layout as in gpt-fast: fused ``wqkv`` (one [q + 2 kv heads] x dim linear),
``wo``, SwiGLU ``w1``/``w3``/``w2``, RMSNorm, RoPE, grouped-query attention through
``F.scaled_dot_product_attention`` on a [B, H_kv, max_seq, D] cache; the output head ``output``
(kept in full precision unless ``--quantize-head``). Default shape: Llama-3-8B (hidden 4096, 32
layers, 32 heads, 8 KV heads, intermediate 14336, vocab 128256); ``--config``/``--layers`` shrink
it. Weights are RANDOM (normal, std 0.02; norms 1): the model is built on the meta device and
materialised directly in the benchmark dtype on the target device (no download, no fp32 copy).
Llama-3's RoPE frequency scaling is omitted (no effect on speed).

What is measured
----------------
Per variant: build -> quantize (``torchao.quantize_``) -> sizes -> KV cache -> (ParetoQ)
``paretoq_ao.triton_kernels.warmup(*model_shapes(model, (1,)))`` so that every decode shape is
autotuned *before* CUDA-graph capture -> ``torch.compile(decode_one_token, mode="reduce-overhead",
fullgraph=True)`` (one token through the model + greedy argmax; CUDA graphs) -> ``--warmup-reps``
untimed generations (compilation, graph recording) -> ``--reps`` timed generations of
``--new-tokens`` tokens after a ``--prompt-len``-token random prompt. The prompt (prefill) runs
eagerly by default (``--prefill compile`` compiles it without CUDA graphs); its [M = prompt-len]
kernel shapes use the kernels' default configs unless ``--tune-prefill``.

Reported (median over the timed repetitions):
* decode tok/s = (new_tokens - 1) / time of the decode loop (the first new token comes from the
  prefill) -- the steady-state, memory-bound figure;
* end-to-end tok/s = new_tokens / (prefill + decode time), as gpt-fast / torchao's generate.py
  report it (the ANCHORS table figures);
* weight bytes: every parameter once, tensor subclasses counted by their inner tensors (packed
  codes + scales); for ParetoQ and bf16 also ``paretoq_ao.model_size(model).total_bytes``;
* bytes/token = weight bytes minus the embedding table (one row of it is read per token) -- the
  definition of the ANCHORS "physical limit"; limit tok/s = peak bandwidth (``--peak-tbps``,
  H100 SXM 3.35 TB/s) / bytes per token; fraction of the limit achieved = decode tok/s / limit;
* speedups vs bf16 and vs the best torchao int4 row (decode tok/s ratios).

Variants (``--variants``, comma list): ``bf16`` (the unquantized model in ``--dtype``), ``int4``
(torchao ``Int4WeightOnlyConfig(group_size=--int4-group-size)`` for each packing format of
``--int4-formats``: ``tile_packed_to_4d`` = tinygemm, ``plain`` needs the mslk kernels; a format
that fails is recorded as unavailable), ``paretoq`` (= ``pq<b>`` for each of ``--bits``) or
``pq<b>`` (``quantize_(model, ParetoQWeightOnlyConfig(bits=b))``: post-training RTN, which is all
a speed measurement needs). The output head stays in ``--dtype`` for every variant unless
``--quantize-head`` (then every nn.Linear, head included, is quantized in int4 and ParetoQ rows).
Note that torchao's ``_models/llama/generate.py`` (the source of the ANCHORS int4 figures) calls
``quantize_(model, int4_weight_only(group_size=...))`` with torchao's default filter, i.e. *with*
the head, and reports end-to-end tok/s with top-k sampling: compare it with ``--quantize-head``
rows and the e2e column.

All variants get the same inductor settings: torchao's ``recommended_inductor_config_setter``
(coordinate-descent tuning, fx graph cache, ...; what gpt-fast and torchao's generate.py use) on
CUDA, ``--no-inductor-tuning`` to leave inductor's defaults.

Splitting a long run (e.g. under a per-command time limit): run subsets of ``--variants`` and pass
earlier JSON results with ``--merge``; the report then covers the union (rows of this run win) and
the speedups use the merged bf16/int4 rows. Results are rewritten after every variant, so a run
that is killed keeps what it finished. Output: ``<results-dir>/bench_decode_<device>_<date>.md``
and ``.json`` (command line, torch/triton/torchao/CUDA versions, GPU name, git commit).

``--time-budget-s`` stops starting variants that would not fit (they are recorded as skipped and
printed with the command to finish them).

Exit status: 0 when every requested bf16/ParetoQ variant that was started ran (int4 formats may be
unavailable, variants may be skipped for the time budget), 3 when one of them failed (recorded in
the results, traceback on stderr), 2 when there is nothing to run on (no CUDA and not
``--device cpu --tiny``) or the arguments are invalid.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from typing import List, Optional

from _meta import git_commit, write_text  # benchmarks/_meta.py (this folder is sys.path[0])

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_BITS = "4,3,2,1.58,1"
INT4_FORMATS = "tile_packed_to_4d,plain"

NO_CUDA_MESSAGE = (
    "bench_decode.py: no CUDA device is available (torch.cuda.is_available() is False); this "
    "benchmark needs an NVIDIA GPU (it was written for an H100). For a CPU smoke test of the whole "
    "flow (tiny model, reference kernels) run it with --device cpu --tiny. Nothing was run."
)


# ---------------------------------------------------------------------------------------------
# Model (gpt-fast style, benchmarks/_decode_model.py; torch is imported lazily so that argument
# errors are instant)
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelArgs:
    vocab_size: int = 128256
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    intermediate_size: int = 14336
    rope_base: float = 500000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


CONFIGS = {
    "llama3-8b": ModelArgs(),
    "llama3.2-3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, intermediate_size=8192),
    "llama3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, intermediate_size=8192),
    # tiny: the CPU smoke test (dims multiples of 128 so that int4 tinygemm also fits on a GPU)
    "tiny": ModelArgs(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                      intermediate_size=256, rope_base=10000.0),
}


def build_model(margs: ModelArgs, device, dtype, seed: int):
    """Random-weight model built on the meta device and materialised in ``dtype`` on ``device``."""
    import torch

    from _decode_model import Transformer  # benchmarks/_decode_model.py (imports torch)

    with torch.device("meta"):
        model = Transformer(margs)
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def decode_one_token(model, cur, input_pos):
    """One decode step: logits of the single new position -> greedy next token [B, 1]."""
    import torch

    logits = model(cur, input_pos)
    return torch.argmax(logits[:, -1], dim=-1, keepdim=True)


def prefill(model, prompt, input_pos):
    import torch

    logits = model(prompt, input_pos)
    return torch.argmax(logits[:, -1], dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _parse_bits(s: str):
    out = []
    for b in s.split(","):
        b = b.strip()
        if b:
            out.append(float(b) if "." in b else int(b))
    return out


def _bits_name(b) -> str:
    return str(b)


def expand_variants(spec: str, bits: List) -> List[str]:
    """'bf16,int4,paretoq' -> ['bf16', 'int4', 'pq4', 'pq3', ...] (order kept, duplicates dropped)."""
    out = []
    for v in (x.strip().lower() for x in spec.split(",")):
        if not v:
            continue
        if v in ("paretoq", "pq"):
            items = [f"pq{_bits_name(b)}" for b in bits]
        elif v in ("bf16", "base", "fp16", "fp32"):
            items = ["bf16"]
        elif v == "int4":
            items = ["int4"]
        elif v.startswith("pq"):
            b = _parse_bits(v[2:])
            if len(b) != 1:
                raise ValueError(f"bad variant {v!r}")
            items = [f"pq{_bits_name(b[0])}"]
        else:
            raise ValueError(f"unknown variant {v!r} (bf16, int4, paretoq, pq<bits>)")
        for it in items:
            if it not in out:
                out.append(it)
    return out


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Batch-1 decode tokens/s: bf16 vs torchao int4 vs ParetoQ (torch.compile + CUDA graphs)")
    ap.add_argument("--config", default=None, choices=sorted(CONFIGS),
                    help="model shape (default llama3-8b; --tiny selects 'tiny')")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny model and few tokens (smoke test; with --device cpu runs without a GPU)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--variants", default="bf16,int4,paretoq",
                    help="comma list of bf16, int4, paretoq (= pq<b> for each --bits), pq<bits>")
    ap.add_argument("--bits", default=DEFAULT_BITS, help="ParetoQ bit widths for 'paretoq'")
    ap.add_argument("--pq-group-size", type=int, default=None,
                    help="ParetoQ scale group size (default: one scale per output row)")
    ap.add_argument("--int4-group-size", type=int, default=64,
                    help="torchao int4 group size (64: the ANCHORS figure; 128: torchao's default)")
    ap.add_argument("--int4-formats", default=INT4_FORMATS,
                    help="torchao int4 packing formats to try (each one a row)")
    ap.add_argument("--quantize-head", action="store_true",
                    help="also quantize the output head (filter_fn selecting every nn.Linear)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 16; tiny 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 128; tiny 8)")
    ap.add_argument("--reps", type=int, default=None, help="timed generations (default 5; tiny 2)")
    ap.add_argument("--warmup-reps", type=int, default=None,
                    help="untimed generations first: compile + CUDA-graph recording (default 2; tiny 1)")
    ap.add_argument("--compile-mode", default=None,
                    choices=["reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs", "none"],
                    help="torch.compile mode of the decode step (default: reduce-overhead on CUDA, "
                         "none = eager on the CPU)")
    ap.add_argument("--prefill", default="eager", choices=["eager", "compile"],
                    help="run the prompt eagerly or compiled (no CUDA graphs)")
    ap.add_argument("--tune-prefill", action="store_true",
                    help="also autotune the ParetoQ kernels for the prompt shape (M = prompt-len)")
    ap.add_argument("--no-inductor-tuning", action="store_true",
                    help="do not apply torchao's recommended inductor settings (coordinate descent ...)")
    ap.add_argument("--peak-tbps", type=float, default=3.35,
                    help="peak HBM bandwidth in TB/s for the memory-bound limit (H100 SXM 3.35, "
                         "H100 PCIe 2.0, H200 4.8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merge", action="append", default=[],
                    help="results JSON of an earlier run to include in the report (repeatable)")
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="", help="extra word in the results file name")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="do not start another variant once this many seconds have passed or the "
                         "slowest variant so far would not fit (skipped variants are recorded)")
    return ap


def _apply_defaults(args) -> None:
    """Fill the size/compile defaults that depend on --tiny / --config / --device."""
    if args.tiny and args.config is None:
        args.config = "tiny"
    args.config = args.config or "llama3-8b"
    small = args.config == "tiny"
    for name, full, tiny in (("prompt_len", 16, 8), ("new_tokens", 128, 8), ("reps", 5, 2),
                             ("warmup_reps", 2, 1)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if small else full)
    if args.compile_mode is None:
        args.compile_mode = "reduce-overhead" if args.device == "cuda" else "none"


def _check_args(ap: argparse.ArgumentParser, args) -> None:
    """Validate the parsed arguments and derive the lists and model shape (``ap.error`` on a bad one)."""
    if args.device == "cpu" and not args.tiny:
        ap.error("--device cpu is a smoke test of the flow: give --tiny as well (an 8B model on the CPU "
                 "measures nothing useful)")
    if args.new_tokens < 2 or args.prompt_len < 1 or args.reps < 1 or args.warmup_reps < 0:
        ap.error("need --new-tokens >= 2, --prompt-len >= 1, --reps >= 1, --warmup-reps >= 0")
    try:
        args.bits_list = _parse_bits(args.bits)
        args.variant_list = expand_variants(args.variants, args.bits_list)
    except ValueError as e:
        ap.error(str(e))
    if not args.variant_list:
        ap.error("no variants selected")
    margs = replace(CONFIGS[args.config])
    if args.layers is not None:
        if args.layers < 1:
            ap.error("--layers must be >= 1")
        margs.n_layers = args.layers
    args.model_args = margs
    args.int4_format_list = [f.strip() for f in args.int4_formats.split(",") if f.strip()]
    for path in args.merge:  # checked now, not after an hour of measurements
        try:
            with open(path) as f:
                json.load(f)["results"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--merge {path}: not a readable bench_decode results JSON ({type(e).__name__}: {e})")


def parse_args(argv=None):
    ap = _build_parser()
    args = ap.parse_args(argv)
    _apply_defaults(args)
    _check_args(ap, args)
    return args


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def tensor_bytes(t) -> int:
    """Storage bytes of a tensor; wrapper subclasses (packed / int4 weights) by their inner tensors."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)
    return t.numel() * t.element_size()


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += tensor_bytes(p)
    return total


def _weight_kind(w) -> str:
    return type(w).__name__


class _Env:
    """Set environment variables for a block (the kernels read PARETOQ_TRITON_AUTOTUNE per call)."""

    def __init__(self, **kv):
        self.kv, self.old = kv, {}

    def __enter__(self):
        for k, v in self.kv.items():
            self.old[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fmt_cfg(cfg) -> Optional[str]:
    if cfg is None:
        return None
    return (f"{cfg.kind} BN{cfg.block_n} BK{cfg.block_k}"
            + (f" BM{cfg.block_m}" if cfg.kind in ("gemm", "gemmw") else "")
            + f" SK{cfg.split_k} w{cfg.num_warps} s{cfg.num_stages}")


# ---------------------------------------------------------------------------------------------
# One variant
# ---------------------------------------------------------------------------------------------


def quantize_variant(model, variant: str, args, int4_format: Optional[str] = None) -> dict:
    """Quantize ``model`` in place for ``variant``; returns facts for the results row."""
    from torch import nn

    head_filter = (lambda m, fqn: isinstance(m, nn.Linear)) if args.quantize_head else \
        (lambda m, fqn: isinstance(m, nn.Linear) and fqn != "output")
    if variant == "bf16":
        return {}
    from torchao.quantization import quantize_

    if variant == "int4":
        from torchao.quantization import Int4WeightOnlyConfig

        cfg = Int4WeightOnlyConfig(group_size=args.int4_group_size, int4_packing_format=int4_format,
                                   set_inductor_config=False)
        quantize_(model, cfg, filter_fn=head_filter)
        return {"group_size": args.int4_group_size, "packing_format": int4_format}
    import paretoq_ao as pq

    bits = _parse_bits(variant[2:])[0]
    cfg = pq.ParetoQWeightOnlyConfig(bits=bits, group_size=args.pq_group_size)
    if args.quantize_head:
        quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    else:
        quantize_(model, cfg)  # default filter: every nn.Linear except the head ("output")
    return {"bits": bits, "group_size": args.pq_group_size}


def _kind(variant: str) -> str:
    return "int4" if variant == "int4" else ("paretoq" if variant.startswith("pq") else "baseline")


def variant_label(variant: str, args, int4_format: Optional[str] = None) -> str:
    head = " +head" if args.quantize_head and variant != "bf16" else ""
    if variant == "bf16":
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[args.dtype]
    if variant == "int4":
        return f"torchao int4 g{args.int4_group_size} {int4_format}{head}"
    g = "" if args.pq_group_size is None else f" g{args.pq_group_size}"
    return f"paretoq {variant[2:]}-bit{g}{head}"


def _build_quantized(variant: str, args, dev, dtype, int4_format, label: str, row: dict, sync):
    """Build the random-weight model and quantize it for ``variant``; build/quantize facts go into ``row``."""
    import torch

    print(f"[{label}] building the model", file=sys.stderr, flush=True)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_model(args.model_args, dev, dtype, args.seed)
    sync()
    row["build_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    row.update(quantize_variant(model, variant, args, int4_format))
    sync()
    row["quantize_s"] = round(time.perf_counter() - t0, 2)
    row["head_weight_type"] = _weight_kind(model.output.weight)
    row["block_weight_type"] = _weight_kind(model.layers[0].feed_forward.w1.weight)
    return model


def _size_facts(model, variant: str, args) -> dict:
    """Weight sizes and the memory-bound limit (call before the caches exist: weights only)."""
    import paretoq_ao as pq

    wb = weight_bytes(model)
    emb = tensor_bytes(model.tok_embeddings.weight)
    per_token = wb - emb
    return {
        "weight_bytes": wb,
        "embedding_bytes": emb,
        "bytes_per_token": per_token,
        "model_size_bytes": None if variant == "int4" else pq.model_size(model).total_bytes,
        "limit_tok_s": args.peak_tbps * 1e12 / per_token,
    }


def _tune_kernels(model, variant: str, args, dev, dtype, row: dict) -> None:
    """ParetoQ: autotune every decode shape before anything is captured in a CUDA graph."""
    row["warmup_s"] = None
    if not variant.startswith("pq"):
        return
    from paretoq_ao.triton_kernels import model_shapes, warmup
    from paretoq_ao.triton_kernels.linear import interpreting

    ms = (1, args.prompt_len) if args.tune_prefill else (1,)
    shapes = model_shapes(model, ms)
    row["kernel_shapes"] = [list(s) for s in shapes]
    if dev.type == "cuda" or interpreting():
        t0 = time.perf_counter()
        chosen = warmup(*shapes, dtype=dtype, device=dev)
        row["warmup_s"] = round(time.perf_counter() - t0, 2)
        row["tuned_configs"] = {"x".join(map(str, k[:3])): _fmt_cfg(c) for k, c in chosen.items()}


def _compile_steps(args, dev, compiled: bool):
    """(decode_fn, prefill_fn, mark_step): the decode step compiled per --compile-mode, the prefill
    per --prefill, and the CUDA-graph step marker (a no-op without CUDA graphs)."""
    import torch

    if compiled:
        if dev.type == "cpu" and args.compile_mode == "reduce-overhead":
            print("note: reduce-overhead on the CPU has no CUDA graphs", file=sys.stderr)
        decode_fn = torch.compile(decode_one_token, mode=args.compile_mode, fullgraph=True)
    else:
        decode_fn = decode_one_token
    prefill_fn = (torch.compile(prefill, fullgraph=True, dynamic=False)
                  if args.prefill == "compile" else prefill)
    # a new CUDA-graph "step" per token (harmless without CUDA graphs)
    mark_step = torch.compiler.cudagraph_mark_step_begin if dev.type == "cuda" and compiled else (lambda: None)
    return decode_fn, prefill_fn, mark_step


def _make_generate(model, prompt, args, dev, prefill_fn, decode_fn, mark_step, sync):
    """``generate()`` -> (tokens [1, new_tokens], prefill seconds, decode-loop seconds)."""
    import torch

    def generate():
        T = prompt.shape[1]
        pos = torch.arange(T, device=dev)
        sync()
        t_a = time.perf_counter()
        tok = prefill_fn(model, prompt, pos)
        sync()
        t_b = time.perf_counter()
        out = [tok.clone()]
        cur = out[0]
        ipos = torch.tensor([T], device=dev, dtype=torch.long)
        for _ in range(args.new_tokens - 1):
            mark_step()
            nxt = decode_fn(model, cur, ipos)
            cur = nxt.clone()  # CUDA-graph outputs are overwritten by the next replay
            out.append(cur)
            ipos += 1
        sync()
        t_c = time.perf_counter()
        return torch.cat(out, 1), t_b - t_a, t_c - t_b

    return generate


def _warm_up_and_time(generate, model, prompt, prefill_fn, args, dev, sync, label: str, row: dict):
    """Untimed warm-up (compilation, CUDA-graph recording), then --reps timed generations;
    returns (last tokens, prefill seconds per rep, decode seconds per rep)."""
    import torch
    from torch._dynamo.utils import counters

    counters.clear()
    print(f"[{label}] compiling and warming up ({args.compile_mode}); "
          f"weights {_bytes(row['weight_bytes'])}", file=sys.stderr, flush=True)
    with torch.no_grad():
        t0 = time.perf_counter()
        # the prompt shape runs with the kernels' default configs unless --tune-prefill
        env = contextlib.nullcontext() if args.tune_prefill else _Env(PARETOQ_TRITON_AUTOTUNE="0")
        with env:
            tok = prefill_fn(model, prompt, torch.arange(args.prompt_len, device=dev))
        sync()
        for i in range(args.warmup_reps):
            toks, _, _ = generate()
            if i == 0:
                row["first_generation_s"] = round(time.perf_counter() - t0, 2)
        row["warmup_total_s"] = round(time.perf_counter() - t0, 2)
        print(f"[{label}] warm-up done in {row['warmup_total_s']:.1f} s; timing {args.reps} generations",
              file=sys.stderr, flush=True)
        pre, dec = [], []
        for _ in range(args.reps):
            toks, tp, td = generate()
            pre.append(tp)
            dec.append(td)
    return toks, pre, dec


def _compile_stats(row: dict, args, on_cuda: bool, label: str) -> None:
    """CUDA-graph skips, graph breaks and graph count of the warm-up and timed runs (dynamo counters)."""
    from torch._dynamo.utils import counters

    row["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
    if on_cuda and row["cudagraph_skips"] and args.compile_mode in ("reduce-overhead", "max-autotune"):
        print(f"[{label}] WARNING: inductor skipped CUDA graphs {row['cudagraph_skips']}x (the reason is "
              "in the 'perf_hints' log above; TORCH_LOGS=perf_hints shows it)", file=sys.stderr, flush=True)
    row["graph_breaks"] = int(sum(counters["graph_break"].values())) if "graph_break" in counters else 0
    row["unique_graphs"] = int(counters["stats"].get("unique_graphs", 0))


def _throughput(row: dict, toks, pre: List[float], dec: List[float], args) -> None:
    """Token checks and the median decode / end-to-end rates of the timed generations."""
    toks_cpu = toks.cpu()
    row["tokens_in_vocab"] = bool(((toks_cpu >= 0) & (toks_cpu < args.model_args.vocab_size)).all())
    row["first_tokens"] = toks_cpu[0, :8].tolist()
    steps = args.new_tokens - 1
    dec_tps = [steps / t for t in dec]
    e2e_tps = [args.new_tokens / (a + b) for a, b in zip(pre, dec)]
    row["decode_tok_s"] = statistics.median(dec_tps)
    row["decode_tok_s_all"] = [round(v, 2) for v in dec_tps]
    row["e2e_tok_s"] = statistics.median(e2e_tps)
    row["ms_per_token"] = 1e3 / row["decode_tok_s"]
    row["prefill_ms"] = statistics.median(pre) * 1e3
    row["frac_of_limit"] = row["decode_tok_s"] / row["limit_tok_s"]
    row["achieved_tbps"] = row["decode_tok_s"] * row["bytes_per_token"] / 1e12


def run_variant(variant: str, args, dev, dtype, int4_format: Optional[str] = None) -> dict:
    import torch

    on_cuda = dev.type == "cuda"
    label = variant_label(variant, args, int4_format)
    row = {"variant": variant, "label": label, "kind": _kind(variant), "status": "ok"}
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    model = _build_quantized(variant, args, dev, dtype, int4_format, label, row, sync)
    # sizes (before the caches exist: the model holds only its weights)
    row.update(_size_facts(model, variant, args))

    max_seq = args.prompt_len + args.new_tokens
    compiled = args.compile_mode != "none"
    model.setup_caches(1, max_seq, static_address=compiled)
    row["kv_cache_bytes"] = model.kv_cache_bytes()
    _tune_kernels(model, variant, args, dev, dtype, row)
    decode_fn, prefill_fn, mark_step = _compile_steps(args, dev, compiled)

    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    prompt = torch.randint(0, args.model_args.vocab_size, (1, args.prompt_len), generator=g).to(dev)
    generate = _make_generate(model, prompt, args, dev, prefill_fn, decode_fn, mark_step, sync)
    toks, pre, dec = _warm_up_and_time(generate, model, prompt, prefill_fn, args, dev, sync, label, row)
    _compile_stats(row, args, on_cuda, label)
    _throughput(row, toks, pre, dec, args)
    if on_cuda:
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    # drop the model, the compiled steps and the closure that holds them before returning
    del generate, model, decode_fn, prefill_fn, mark_step
    return row


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def add_speedups(rows: List[dict]) -> dict:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("decode_tok_s")]
    base = next((r for r in ok if r["variant"] == "bf16"), None)
    int4 = max((r for r in ok if r["variant"] == "int4"), key=lambda r: r["decode_tok_s"], default=None)
    for r in rows:
        ok_r = r.get("status") == "ok" and r.get("decode_tok_s")
        r["speedup_vs_bf16"] = r["decode_tok_s"] / base["decode_tok_s"] if ok_r and base else None
        r["speedup_vs_int4"] = r["decode_tok_s"] / int4["decode_tok_s"] if ok_r and int4 else None
    return {"bf16": base["label"] if base else None, "int4": int4["label"] if int4 else None}


def merge_rows(current: List[dict], files: List[str], meta: dict) -> List[dict]:
    """Rows of earlier results files (``--merge``) + this run's; a label measured in this run wins,
    a label this run skipped keeps the earlier measurement."""
    labels = {r["label"] for r in current if r.get("status") != "skipped"}
    merged = []
    for path in files:
        with open(path) as f:
            data = json.load(f)
        other = data.get("meta", {})
        for key in ("model", "prompt_len", "new_tokens", "device", "dtype", "quantize_head"):
            if other.get(key) != meta.get(key):
                print(f"warning: --merge {path}: {key} differs ({other.get(key)!r} vs {meta.get(key)!r})",
                      file=sys.stderr)
        for r in data.get("results", []):
            if r.get("label") not in labels:
                labels.add(r.get("label"))
                merged.append(dict(r, source=r.get("source") or os.path.basename(path)))
    have = {r.get("label") for r in merged}
    return merged + [r for r in current if not (r.get("status") == "skipped" and r["label"] in have)]


def _f(v, spec, empty=""):
    return empty if v is None else format(v, spec)


def _bytes(v) -> str:
    if v is None:
        return ""
    return f"{v / 1e9:.3f} GB" if v >= 1e8 else f"{v / 1e6:.3f} MB"


def write_results(args, meta, rows, base_path):
    rows = [dict(r) for r in rows]
    baselines = add_speedups(rows)
    meta = dict(meta, speedup_baselines=baselines)
    write_text(base_path + ".json", json.dumps({"meta": meta, "results": rows}, indent=1))

    m = meta["model"]
    lines = [
        f"# Batch-1 decode: bf16 vs torchao int4 vs ParetoQ -- {meta['device']}",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; git {meta['git']}; torch {meta['torch']}, triton {meta['triton']}, "
        f"CUDA {meta['cuda']}, torchao {meta['torchao']}",
        f"- device: {meta['device']}; peak bandwidth assumed {meta['peak_tbps']} TB/s",
        f"- model: gpt-fast-style Llama, random weights, {meta['dtype']}: {meta['config']} -- dim {m['dim']}, "
        f"{m['n_layers']} layers, {m['n_heads']} heads / {m['n_kv_heads']} KV heads, "
        f"intermediate {m['intermediate_size']}, vocab {m['vocab_size']}; head "
        f"{'quantized' if meta['quantize_head'] else 'kept in ' + meta['dtype']}",
        f"- decode: batch 1, prompt {meta['prompt_len']} tokens ({meta['prefill']}), {meta['new_tokens']} "
        f"new tokens, greedy; torch.compile mode={meta['compile_mode']} fullgraph=True; static KV cache; "
        f"{meta['warmup_reps']} warm-up + {meta['reps']} timed generations, median; inductor tuning: "
        f"{meta['inductor_tuning']}",
        "- decode tok/s = (new - 1) / decode-loop time; e2e tok/s = new / (prefill + decode) (gpt-fast "
        "style); bytes/token = weights minus the embedding table; limit = peak BW / bytes per token",
        f"- speedups: decode tok/s over {baselines['bf16'] or '(no bf16 row)'} and over "
        f"{baselines['int4'] or '(no int4 row)'}",
        "",
        "| variant | weights | bytes/token | limit tok/s | decode tok/s | % of limit | "
        "e2e tok/s | ms/token | vs bf16 | vs int4 | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = r.get("status") == "ok"
        status = "ok" if ok else f"{r.get('status')}: {(r.get('error') or '')[:120]}"
        if r.get("source"):
            status += f" (from {r['source']})"
        if ok and r.get("cudagraph_skips"):
            status += f"; CUDA graphs skipped {r['cudagraph_skips']}x"
        lines.append(
            f"| {r['label']} | {_bytes(r.get('weight_bytes'))} | "
            f"{_bytes(r.get('bytes_per_token'))} | {_f(r.get('limit_tok_s'), '.0f')} | "
            f"{_f(r.get('decode_tok_s'), '.1f')} | "
            f"{_f(None if r.get('frac_of_limit') is None else 100 * r['frac_of_limit'], '.1f')} | "
            f"{_f(r.get('e2e_tok_s'), '.1f')} | {_f(r.get('ms_per_token'), '.2f')} | "
            f"{_f(r.get('speedup_vs_bf16'), '.2f')} | {_f(r.get('speedup_vs_int4'), '.2f')} | {status} |")
    lines += ["", "## Build, tuning and compile times", "",
              "| variant | total s | build s | quantize s | kernel warmup s | first generation s | "
              "prefill ms | peak mem GiB | head weight | block weight |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {_f(r.get('variant_s'), '')} | {_f(r.get('build_s'), '')} | "
            f"{_f(r.get('quantize_s'), '')} | "
            f"{_f(r.get('warmup_s'), '')} | {_f(r.get('first_generation_s'), '')} | "
            f"{_f(r.get('prefill_ms'), '.1f')} | {_f(r.get('peak_mem_gib'), '')} | "
            f"{r.get('head_weight_type', '')} | {r.get('block_weight_type', '')} |")
    tuned = [r for r in rows if r.get("tuned_configs")]
    if tuned:
        lines += ["", "## ParetoQ kernel configs chosen by warmup (M x N x K: config)", ""]
        for r in tuned:
            cfgs = "; ".join(f"{k}: {v}" for k, v in r["tuned_configs"].items())
            lines.append(f"- {r['label']}: {cfgs}")
    write_text(base_path + ".md", "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _device_unusable(args) -> bool:
    """True (after a message on stderr) when --device cuda cannot be benchmarked here."""
    import torch

    from paretoq_ao.ops import triton_interpreting

    if args.device == "cuda":
        if not torch.cuda.is_available():
            print(NO_CUDA_MESSAGE, file=sys.stderr)
            return True
        if triton_interpreting():
            print("bench_decode.py: unset TRITON_INTERPRET to benchmark compiled kernels", file=sys.stderr)
            return True
    return False


def _library_versions():
    """(triton version, torchao version); 'unavailable (<error>)' for one that does not import."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # noqa: BLE001
        triton_version = f"unavailable ({type(e).__name__})"
    try:
        import torchao

        torchao_version = torchao.__version__
    except Exception as e:  # noqa: BLE001
        torchao_version = f"unavailable ({type(e).__name__})"
    return triton_version, torchao_version


def _device_info(args):
    """(torch.device, device name, compute capability or None)."""
    import torch

    if args.device == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(dev)
        device_name = props.name
        capability = f"{props.major}.{props.minor}"
    else:
        dev = torch.device("cpu")
        device_name = f"CPU {platform.processor() or platform.machine()}".strip()
        capability = None
    return dev, device_name, capability


def _setup_inductor(args) -> bool:
    """perf_hints logging and torchao's recommended inductor settings (CUDA, compiled); returns whether
    the inductor tuning is on."""
    import torch

    if args.device == "cuda" and args.compile_mode != "none" and not os.environ.get("TORCH_LOGS"):
        torch._logging.set_logs(perf_hints=True)  # e.g. why CUDA graphs were skipped
    inductor_tuning = args.device == "cuda" and args.compile_mode != "none" and not args.no_inductor_tuning
    if inductor_tuning:
        try:
            from torchao.quantization.utils import recommended_inductor_config_setter

            recommended_inductor_config_setter()
        except ImportError:  # the same settings by hand
            import torch._inductor.config as ic

            ic.coordinate_descent_tuning = True
            ic.coordinate_descent_check_all_directions = True
            ic.force_fuse_int_mm_with_mul = True
            ic.fx_graph_cache = True
            ic.triton.unique_kernel_names = True
    return inductor_tuning


def _run_meta(args, argv, dev, device_name, capability, versions, inductor_tuning: bool) -> dict:
    """The ``meta`` block of the results: command, versions, device, model and run settings."""
    import torch

    from paretoq_ao.ops import triton_interpreting

    triton_version, torchao_version = versions
    return {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "argv": list(sys.argv if argv is None else argv),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": device_name, "device_type": dev.type, "capability": capability,
        "torch": torch.__version__, "triton": triton_version, "torchao": torchao_version,
        "cuda": torch.version.cuda, "python": platform.python_version(), "git": git_commit(),
        "host": platform.node(), "config": args.config, "model": asdict(args.model_args),
        "dtype": args.dtype, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "reps": args.reps, "warmup_reps": args.warmup_reps, "compile_mode": args.compile_mode,
        "fullgraph": True, "prefill": args.prefill, "tune_prefill": args.tune_prefill,
        "inductor_tuning": inductor_tuning, "peak_tbps": args.peak_tbps,
        "quantize_head": args.quantize_head, "pq_group_size": args.pq_group_size,
        "int4_group_size": args.int4_group_size, "variants": args.variant_list,
        "triton_interpret": triton_interpreting(),
        "limit_definition": "peak_tbps * 1e12 / (weight bytes - embedding table bytes)",
        "merged_from": [os.path.basename(p) for p in args.merge],
    }


def _results_base_path(args, device_name: str, dev) -> str:
    """``<results-dir>/bench_decode_<device>[_<tag>]_<stamp>`` (the folder is created)."""
    os.makedirs(args.results_dir, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or dev.type
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = f"_{re.sub(r'[^A-Za-z0-9.-]+', '-', args.tag)}" if args.tag else ""
    return os.path.join(args.results_dir, f"bench_decode_{slug}{tag}_{stamp}")


def _jobs(args) -> list:
    """(variant, int4 packing format or None) for each row to measure, in order."""
    jobs = []
    for v in args.variant_list:
        if v == "int4":
            jobs += [(v, fmt) for fmt in args.int4_format_list]
        else:
            jobs.append((v, None))
    return jobs


def _skipped_row(variant: str, label: str, elapsed: float, args) -> dict:
    return {"variant": variant, "label": label, "status": "skipped", "kind": _kind(variant),
            "error": f"time budget: {elapsed:.0f} s used of --time-budget-s "
                     f"{args.time_budget_s:.0f}"}


def _failed_row(variant: str, label: str, fmt, e: Exception, args) -> dict:
    """The row of a variant that raised ``e`` (call it from the ``except`` block: it formats the
    exception being handled)."""
    tb = traceback.format_exc()
    if variant != "int4":  # an unavailable int4 format is expected on some stacks: one line
        print(tb, file=sys.stderr)
    status = "unavailable" if variant == "int4" else "failed"
    row = {"variant": variant, "label": label, "status": status,
           "kind": _kind(variant),
           "error": f"{type(e).__name__}: {str(e)[:400]}", "traceback_tail": tb[-2000:]}
    if variant == "int4":
        row.update(group_size=args.int4_group_size, packing_format=fmt)
    return row


def _print_outcome(label: str, row: dict) -> None:
    if row.get("status") == "ok":
        print(f"[{label}] decode {row['decode_tok_s']:.1f} tok/s ({100 * row['frac_of_limit']:.1f}% of "
              f"the {row['limit_tok_s']:.0f} tok/s limit), e2e {row['e2e_tok_s']:.1f} tok/s, weights "
              f"{_bytes(row['weight_bytes'])}", file=sys.stderr, flush=True)
    else:
        print(f"[{label}] {row['status']}: {row['error']}", file=sys.stderr, flush=True)


def _free_variant_memory(dev) -> None:
    """Free the model, compiled graphs and CUDA-graph pools before the next variant."""
    import torch._dynamo

    torch._dynamo.reset()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _run_jobs(jobs, args, dev, dtype, meta: dict, base_path: str):
    """Measure every job (within --time-budget-s), rewriting the results after each one;
    returns (rows, skipped labels, whether a required variant failed)."""
    rows: List[dict] = []
    failed_required = False
    t_start, slowest = time.perf_counter(), 0.0
    skipped = []
    for variant, fmt in jobs:
        label = variant_label(variant, args, fmt)
        elapsed = time.perf_counter() - t_start
        if args.time_budget_s is not None and elapsed + slowest > args.time_budget_s:
            skipped.append(label)
            rows.append(_skipped_row(variant, label, elapsed, args))
            print(f"[{label}] skipped (time budget)", file=sys.stderr, flush=True)
            continue
        t_variant = time.perf_counter()
        try:
            row = run_variant(variant, args, dev, dtype, fmt)
        except Exception as e:  # noqa: BLE001 - record and go on with the other variants
            row = _failed_row(variant, label, fmt, e, args)
            if variant != "int4":
                failed_required = True
        rows.append(row)
        row["variant_s"] = round(time.perf_counter() - t_variant, 1)
        slowest = max(slowest, row["variant_s"])
        _print_outcome(label, row)
        _free_variant_memory(dev)
        write_results(args, meta, merge_rows(rows, args.merge, meta), base_path)
    return rows, skipped, failed_required


def main(argv=None) -> int:
    args = parse_args(argv)
    if _device_unusable(args):
        return 2
    import torch

    import paretoq_ao  # noqa: F401  (registers paretoq::linear)

    versions = _library_versions()
    dtype = getattr(torch, args.dtype)
    dev, device_name, capability = _device_info(args)
    inductor_tuning = _setup_inductor(args)
    meta = _run_meta(args, argv, dev, device_name, capability, versions, inductor_tuning)
    print(f"# {device_name}  torch {meta['torch']}  triton {versions[0]}  torchao {versions[1]}  "
          f"model {args.config} ({args.model_args.n_layers} layers)  variants {args.variant_list}",
          file=sys.stderr, flush=True)

    base_path = _results_base_path(args, device_name, dev)
    jobs = _jobs(args)
    torch.manual_seed(args.seed)
    rows, skipped, failed_required = _run_jobs(jobs, args, dev, dtype, meta, base_path)

    all_rows = merge_rows(rows, args.merge, meta)
    write_results(args, meta, all_rows, base_path)
    print(f"wrote {base_path}.md and {base_path}.json", file=sys.stderr)
    if skipped:
        print(f"skipped for the time budget (run them with --variants ... --merge {base_path}.json): "
              f"{', '.join(skipped)}", file=sys.stderr)
    with open(base_path + ".md") as f:
        print(f.read())
    return 3 if failed_required else 0


if __name__ == "__main__":
    sys.exit(main())
