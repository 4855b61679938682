#!/usr/bin/env python
"""PyTorch CPU decode throughput of a Llama-style decoder: fp32 vs ParetoQ packed vs torchao, eager and compiled.

The path a user takes on a CPU: a ``transformers`` ``LlamaForCausalLM`` (the decoder shape of
``bench_executorch_decoder.py``: hidden 2048, intermediate 5632, 32 heads / 4 KV heads, vocab
32000, untied head, random weights from ``LlamaForCausalLM(cfg)``; 16 layers here), batch 1, a
``StaticCache`` and a manual greedy loop of ``model(input_ids=token, cache=cache,
logits_to_keep=1)`` -- the same forward in eager and compiled mode.

    python benchmarks/bench_cpu_decoder.py                                  # everything (long, see below)
    python benchmarks/bench_cpu_decoder.py --layers 4 --variants fp32,pq2,pq2-i8,ao-8da4w --threads 1
    python benchmarks/bench_cpu_decoder.py --head pq4                       # lm_head 4-bit (ours) too
    python benchmarks/bench_cpu_decoder.py --quick --out /tmp/r.md          # tiny, for the test

Variants (``--variants``): ``fp32``; ``pq<b>`` (b = 4, 3, 2, 1.58, 1: ``ParetoQWeightOnlyConfig(bits=b)``,
float activations, ``paretoq::linear``) and ``pq<b>-i8`` (``activations="int8"``,
``paretoq::linear_8da``), one scale per row; ``pq2-g64`` (2-bit, group size 64); ``ao-8da4w``
(torchao ``Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
weight_granularity=PerGroup(32))``, its default packing ``unpacked_to_int8``) and ``ao-int4wo``
(torchao ``Int4WeightOnlyConfig(group_size=64)``: each packing format is tried on a small linear
first; when none runs on this CPU the variant is recorded as "n/a: <errors>"). Only the block
linears (q/k/v/o/gate/up/down) are quantized: ours through torchao's default filter (our handler
keeps the output head), torchao's through a block filter. The lm_head stays fp32 unless ``--head
pq4`` (then every quantized variant gets our 4-bit head, int8 activations for ``-i8`` and
``ao-8da4w``). Every variant is built from one saved fp32 state dict (shared, not copied: the
quantized layers get new tensors) and freed after it is measured (16 layers: ~3.3 GB of fp32
tensors, plus the quantized copy of one variant at a time; the peak RSS is reported).

Modes (``--modes``): ``eager``, and ``compile`` = ``torch.compile(model.forward, fullgraph=True,
dynamic=False)`` (one static graph for the prefill shape and one for the decode step; the static
cache keeps its position in a tensor, so no recompilation per step). If dynamo refuses the full
graph, the default (graph breaks allowed) is used and the table says so. Compiled graphs are made
afresh per thread count (``torch._dynamo.reset()``): inductor's CPU kernels bake the OpenMP thread
count in at compile time.

Timing, per (variant, thread count, mode): ``torch.set_num_threads(t)``; one untimed warm-up
generation (compilation, first-call setup), then ``--reps`` generations on a reset cache; each
times the prefill (``--prompt-len`` random tokens -> first token) and the decode loop
(``--new-tokens`` greedy steps, one token each, ``time.perf_counter`` around the whole loop; decode
tok/s = new_tokens / loop time). Reported: the median over reps, and the warm-up time (for
compile: compilation included). The lm_head alone (same mode, a
[1, 1, hidden] input, median of many calls) is timed and subtracted from the step time: the rest
of the step is what the block weights cost, and block weight bytes / rest time is the read
bandwidth achieved, next to this machine's DRAM read bandwidth (the kernel library's streaming read
of a 1 GiB buffer, ``_meta.dram_bandwidth``, best of 5, per thread count). ParetoQ variants must have run our C++ kernels
(``paretoq_ao.export.cpu_backend.call_count``, counted over the timed decode loops; per token =
7 x layers, +1 with ``--head pq4``): the script stops if a packed variant made no kernel call.

Checks: the greedy tokens of every variant in compile mode vs its own eager run (same thread
count). Where they differ, both are fed the eager tokens (teacher forcing) and the argmax
agreement and max |dlogits| are reported next to eager's own sensitivity (eager again with the
embedding output perturbed by 1e-7 relative): the ops are the same, but inductor rounds the float
ops around them differently, and int8 activation rounding is discontinuous, so in a random-weight
low-bit model a 1e-7 change can move the logits by ~0.1 and flip a near-tie greedy token. The
relative L2 of the logits of the first decode step (prompt, then fp32's first token,
eager, first thread count) vs the fp32 model, and of ``pq<b>-i8`` vs ``pq<b>`` (the int8
activation error alone).

Ratios: each row's tok/s over fp32 eager and over fp32 compiled (same thread count); targets: pq2
and pq2-i8 >= 3x fp32 eager and >= 2x fp32 compiled (PASS/MISS). Output: a markdown file written
atomically (``--out``, default ``benchmarks/results/cpu-decoder-<date>.md``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import inspect
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from _decoder import add_shape_args, fill_shape, is_block_linear, llama_config  # noqa: E402
from _meta import dram_bandwidth, results_path, write_text  # noqa: E402
import _llamacpp_rows  # noqa: E402
from _cpu_decoder_report import rel_l2, report  # noqa: E402  (the Markdown of this script)

BITS = ("4", "3", "2", "1.58", "1")
ALL_VARIANTS = (("fp32",) + tuple(v for b in BITS for v in (f"pq{b}", f"pq{b}-i8"))
                + ("pq2-g64", "ao-8da4w", "ao-int4wo"))
MODES = ("eager", "compile")
QUICK = dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=512)
INT4_FORMATS = ("plain", "tile_packed_to_4d", "plain_int32", "preshuffled")


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny config (2 layers, hidden 256, vocab 512, 8+4 tokens, 1 rep, fp32,pq2,pq2-i8, 1 thread)")
    add_shape_args(ap, QUICK, "--quick")
    ap.add_argument("--variants", default=None, help=f"comma list of {', '.join(ALL_VARIANTS)} (default: all)")
    ap.add_argument("--modes", default="eager,compile", help="comma list of eager, compile")
    ap.add_argument("--threads", default=None, help="comma list of thread counts (default 1,2; 1 with --quick)")
    ap.add_argument("--head", choices=("fp32", "pq4"), default="fp32", help="lm_head of the quantized variants")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 32 (8 with --quick)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 32 (4 with --quick)")
    ap.add_argument("--reps", type=int, default=None, help="timed generations, default 3 (1 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="markdown results (default benchmarks/results/cpu-decoder-<date>.md)")
    ap.add_argument("--llama-cpp", default=None, metavar="DIR",
                    help="a built llama.cpp (build/bin/llama-bench): adds llama.cpp prefill/decode rows on the same "
                         "weights (benchmarks/_llamacpp_rows.py)")
    ap.add_argument("--gguf", default="", help="with --llama-cpp: comma list of pq<bits>[-g64][=TYPE] rows (default: "
                    "every pq variant with float activations, in its default GGUF type)")
    a = ap.parse_args(argv)
    fill_shape(a, QUICK, a.quick)
    quick = dict(prompt_len=8, new_tokens=4, reps=1, threads="1", variants="fp32,pq2,pq2-i8")
    full = dict(prompt_len=32, new_tokens=32, reps=3, threads="1,2", variants=",".join(ALL_VARIANTS))
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [v for v in a.variants if v not in ALL_VARIANTS] + [m for m in a.modes if m not in MODES]
    if bad:
        ap.error(f"unknown variant(s)/mode(s) {bad}; variants: {ALL_VARIANTS}, modes: {MODES}")
    a.threads = [int(t) for t in a.threads.split(",")]
    if min(a.threads) < 1 or min(a.prompt_len, a.new_tokens, a.reps) < 1:
        ap.error("threads, --prompt-len, --new-tokens and --reps must be >= 1")
    a.gguf = _llamacpp_rows.parse_specs(a.gguf, a.variants, ap.error) if a.llama_cpp else []
    odd = [name for name, variant, *_ in a.gguf if variant not in ALL_VARIANTS]
    if odd:
        ap.error(f"--gguf row(s) {odd}: weights this script does not build (variants: {ALL_VARIANTS})")
    return a


def _spec(v):
    """Variant name -> dict(kind, bits, acts, group)."""
    if v == "fp32" or v.startswith("ao-"):
        return dict(kind=v if v == "fp32" else "ao", bits=None, acts="int8" if v == "ao-8da4w" else "float", group=None)
    name, _, suffix = v[2:].partition("-")
    bits = 1.58 if name == "1.58" else int(name)
    return dict(kind="pq", bits=bits, acts="int8" if suffix == "i8" else "float", group=64 if suffix == "g64" else None)


def _config(a):
    return llama_config(a, a.prompt_len + a.new_tokens + 1)


# --------------------------------------------------------------------------- building the variants

def _fresh(cfg, state, buffers):
    """A LlamaForCausalLM sharing the saved fp32 tensors (built on meta, loaded with assign=True)."""
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.load_state_dict(state, assign=True, strict=True)
    for name, buf in buffers.items():  # non-persistent buffers (rotary inv_freq) are not in the state dict
        mod_name, _, leaf = name.rpartition(".")
        model.get_submodule(mod_name)._buffers[leaf] = buf
    return model.eval()


def _int4wo(model):
    """torchao Int4WeightOnlyConfig(group_size=64) with the first packing format that runs here on a
    small fp32 linear; returns "" or "n/a: <format: error; ...>"."""
    from torchao import quantize_
    from torchao.quantization import Int4WeightOnlyConfig
    errors = []
    for fmt in INT4_FORMATS:
        # set_inductor_config=False: keep inductor's global settings equal for every variant
        cfg = Int4WeightOnlyConfig(group_size=64, int4_packing_format=fmt, set_inductor_config=False)
        probe = nn.Linear(128, 64, bias=False)
        try:  # third-party: each format fails differently on CPU (missing kernels, dtype, device)
            quantize_(probe, cfg)
            probe(torch.randn(1, 128))
        except Exception as e:  # noqa: BLE001 - recorded, the benchmark goes on
            errors.append(f"{fmt}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            continue
        quantize_(model, cfg, filter_fn=is_block_linear)
        return "", fmt
    return "n/a: " + "; ".join(errors), None


def _build(cfg, state, buffers, v, head):
    """(model, note): variant ``v`` from the shared fp32 tensors; note = "" or "n/a: ..."."""
    from torchao import quantize_
    from paretoq_ao import ParetoQWeightOnlyConfig
    sp, model, note = _spec(v), _fresh(cfg, state, buffers), ""
    if sp["kind"] == "pq":  # torchao's default filter: our handler keeps the lm_head
        quantize_(model, ParetoQWeightOnlyConfig(bits=sp["bits"], group_size=sp["group"], activations=sp["acts"]))
    elif v == "ao-8da4w":
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup
        cfg8 = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))
        quantize_(model, cfg8, filter_fn=is_block_linear)
    elif v == "ao-int4wo":
        note, fmt = _int4wo(model)
        if fmt:
            note = f"packing format {fmt}"
    if sp["kind"] != "fp32" and head == "pq4" and not note.startswith("n/a"):
        quantize_(model, ParetoQWeightOnlyConfig(bits=4, activations=sp["acts"]),
                  filter_fn=lambda mod, fqn: fqn == "lm_head")
    return model, note


def _tensor_bytes(t):
    """Stored bytes: tensor subclasses by their inner tensors (packed codes + scales, ...)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _weight_bytes(model):
    """dict(block, head, total) of stored parameter bytes."""
    out = dict(block=0, head=0, total=0)
    for name, p in model.named_parameters():
        n = _tensor_bytes(p)
        out["total"] += n
        if name.startswith("lm_head."):
            out["head"] += n
        elif ".layers." in name and name.endswith("proj.weight"):
            out["block"] += n
    return out


def _head_desc(model):
    from paretoq_ao import ParetoQPackedTensor
    w = model.lm_head.weight
    if isinstance(w, ParetoQPackedTensor):
        return f"pq{w.bits:g} (ours, {w.activations} activations)"
    return "fp32" if type(w) in (torch.Tensor, nn.Parameter) else type(w).__name__


# --------------------------------------------------------------------------- running

def _new_cache(model, max_len):
    from transformers import StaticCache
    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=max_len)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache.early_initialization(1, cfg.num_key_value_heads, head_dim, torch.float32, torch.device("cpu"))
    return cache


@functools.lru_cache(maxsize=None)
def _takes_cache_arg():
    from transformers import LlamaForCausalLM
    return "cache" in inspect.signature(LlamaForCausalLM.forward).parameters


def _cache_kwargs(cache, start, n):
    """The forward's cache arguments. transformers 5.x (here 5.24) takes ``cache=`` and the
    StaticCache keeps its position in a tensor (``cache_position`` is gone); older releases take
    ``past_key_values=`` and ``cache_position`` (that branch is not exercised by the test here)."""
    if _takes_cache_arg():
        return dict(cache=cache)
    return dict(past_key_values=cache, cache_position=torch.arange(start, start + n))


def _generate(fwd, cache, prompt, n_new, force=None):
    """Prefill ``prompt`` then ``n_new`` greedy steps (fed ``force[i]`` instead of the argmax when
    given: teacher forcing). Returns dict(prefill_s, decode_s, tokens (the argmax of every step,
    prefill first), logits (of every step, only with ``force``), calls = C++ kernel calls (float,
    int8) during the decode loop)."""
    cache.reset()
    kept = []
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = fwd(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1,
                     **_cache_kwargs(cache, 0, len(prompt))).logits
        tokens = [int(logits[0, -1].argmax())]
        c0, t1 = _calls(), time.perf_counter()
        for i in range(n_new):
            if force is not None:
                kept.append(logits[0, -1].clone())
            feed = tokens[-1] if force is None else force[i]
            logits = fwd(input_ids=torch.tensor([[feed]]), use_cache=True, logits_to_keep=1,
                         **_cache_kwargs(cache, len(prompt) + i, 1)).logits
            tokens.append(int(logits[0, -1].argmax()))
        t2, c1 = time.perf_counter(), _calls()
    if force is not None:
        kept.append(logits[0, -1].clone())
    return dict(prefill_s=t1 - t0, decode_s=t2 - t1, tokens=tokens, logits=kept,
                calls=(c1[0] - c0[0], c1[1] - c0[1]))


def _compile(model, warm):
    """torch.compile(model.forward, fullgraph=True, dynamic=False), warmed up by ``warm(fn)``; if
    dynamo refuses the full graph, the default (graph breaks allowed). Returns (fn, description)."""
    torch._dynamo.reset()
    fn = torch.compile(model.forward, fullgraph=True, dynamic=False)
    try:
        warm(fn)
        return fn, "fullgraph"
    except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as e:
        why = str(e).strip().splitlines()[0][:160]
        torch._dynamo.reset()
        fn = torch.compile(model.forward, dynamic=False)
        warm(fn)
        return fn, f"default (fullgraph failed: {why})"


def _time_head(head, hidden, n):
    """Median seconds of ``head`` on one [1, 1, hidden] hidden state."""
    x = torch.randn(1, 1, hidden)
    ts = []
    with torch.no_grad():
        for _ in range(3):
            head(x)
        for _ in range(n):
            t0 = time.perf_counter()
            head(x)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _calls():
    from paretoq_ao.export import cpu_backend
    return cpu_backend.call_count(False), cpu_backend.call_count(True)


def _measure(model, mode, a, prompt, max_len):
    """One (variant, threads, mode): warm-up, ``a.reps`` timed generations, the head alone.
    Returns dict(prefill_s, tok_s, step_s, head_s, tokens, calls (float, int8) per token, compile,
    warm_s, fn = the forward used)."""
    cache = _new_cache(model, max_len)
    run = lambda fn: _generate(fn, cache, prompt, a.new_tokens)  # noqa: E731
    t0 = time.perf_counter()
    if mode == "compile":
        fwd, how = _compile(model, run)
        head = torch.compile(model.lm_head, fullgraph=True, dynamic=False)
    else:
        fwd, how, head = model.forward, "-", model.lm_head
        run(fwd)
    warm_s = time.perf_counter() - t0
    runs = [run(fwd) for _ in range(a.reps)]
    n_steps = a.reps * a.new_tokens
    decode_s = statistics.median(r["decode_s"] for r in runs)
    step_s = decode_s / a.new_tokens
    return dict(prefill_s=statistics.median(r["prefill_s"] for r in runs), step_s=step_s, tok_s=1.0 / step_s,
                head_s=_time_head(head, a.hidden, max(20, a.new_tokens)), tokens=runs[0]["tokens"],
                calls=tuple(sum(r["calls"][i] for r in runs) / n_steps for i in (0, 1)), compile=how,
                warm_s=warm_s, fn=fwd, cache=cache)


def _measure_guarded(model, mode, a, prompt, max_len, v):
    if not v.startswith("ao-"):
        return _measure(model, mode, a, prompt, max_len)
    try:  # third-party torchao tensors: eager/compile failures on CPU are not ours to predict
        return _measure(model, mode, a, prompt, max_len)
    except Exception as e:  # noqa: BLE001 - recorded as "n/a: <error>", the benchmark goes on
        torch._dynamo.reset()
        return dict(error=f"n/a: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}")


def _kernel_plan(model, sp):
    """What the C++ library runs for the first q_proj at M = 1 (e.g. "avx512 int8, ...")."""
    from paretoq_ao.export import cpu_backend
    w = model.model.layers[0].self_attn.q_proj.weight
    return cpu_backend.plan(torch.randn(1, w.shape[1]), w.qdata, w.scale, w.bits, sp["acts"] == "int8")


def _build_guarded(cfg, state, buffers, v, head):
    if not v.startswith("ao-"):
        return _build(cfg, state, buffers, v, head)
    try:  # third-party torchao configs: their failure modes on this CPU are not ours to predict
        return _build(cfg, state, buffers, v, head)
    except Exception as e:  # noqa: BLE001 - recorded as "n/a: <error>", the benchmark goes on
        return None, f"n/a: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


def _run_variant(v, cfg, state, buffers, a, prompt, max_len, ref):
    """Build, check and time one variant over threads x modes; frees it. Returns its info dict."""
    sp, t0 = _spec(v), time.perf_counter()
    model, note = _build_guarded(cfg, state, buffers, v, a.head)
    info = dict(variant=v, spec=sp, note=note, quant_s=time.perf_counter() - t0, rows={})
    if model is None or note.startswith("n/a"):
        print(f"{v}: {note}", flush=True)
        return info
    info.update(bytes=_weight_bytes(model), head=_head_desc(model),
                plan=_kernel_plan(model, sp) if sp["kind"] == "pq" else "")
    torch.set_num_threads(a.threads[0])
    step = _generate(model.forward, _new_cache(model, max_len), prompt, 1, force=[ref["first"]])["logits"][1]
    info.update(logits=step, rel_l2=rel_l2(step, ref["logits"]),
                argmax_ok=int(step.argmax()) == int(ref["logits"].argmax()))
    print(f"{v}: built in {info['quant_s']:.1f} s; block weights {info['bytes']['block'] / 1e6:.1f} MB, total "
          f"{info['bytes']['total'] / 1e6:.1f} MB, lm_head {info['head']}; logits rel L2 vs fp32 "
          f"{info['rel_l2']:.3e}{'; ' + info['plan'] if info['plan'] else ''}{'; ' + note if note else ''}", flush=True)
    for t in a.threads:
        torch.set_num_threads(t)
        for mode in a.modes:
            r = _measure_guarded(model, mode, a, prompt, max_len, v)
            info["rows"][(mode, t)] = r
            _print_row(v, mode, t, r, info)
        _check_tokens(info, model, prompt, t)
    for r in info["rows"].values():  # the compiled graphs and caches go with the model
        for k in ("fn", "cache"):
            r.pop(k, None)
    if sp["kind"] == "pq":
        idx = 1 if sp["acts"] == "int8" else 0
        idle = [k for k, r in info["rows"].items() if r["calls"][idx] <= 0]
        if idle:
            raise RuntimeError(f"{v}: no C++ kernel call ({sp['acts']} activations) in {idle}: the packed "
                               f"layers did not run paretoq_ao's CPU kernels")
    del model
    gc.collect()
    torch._dynamo.reset()
    return info


def _check_tokens(info, model, prompt, t):
    """Compiled greedy tokens vs the eager run at the same thread count: "yes" / "no" / "n/a". When
    they differ: teacher-forced check (both fed the eager tokens): argmax agreement and max |dlogits|,
    next to eager's own sensitivity (eager with the embedding output perturbed by 1e-7 relative)."""
    eager, comp = info["rows"].get(("eager", t)), info["rows"].get(("compile", t))
    if comp is None or "error" in comp:
        return
    if eager is None or "error" in eager:
        comp["agree"] = "n/a (no eager run)"
        return
    ref, got = eager["tokens"], comp["tokens"]
    if got == ref:
        comp["agree"] = "yes"
    else:
        force = ref[:-1]
        le = torch.stack(_generate(eager["fn"], eager["cache"], prompt, len(force), force)["logits"])
        lc = torch.stack(_generate(comp["fn"], comp["cache"], prompt, len(force), force)["logits"])
        hook = model.model.embed_tokens.register_forward_hook(
            lambda mod, inp, out: out * (1 + 1e-7 * torch.randn_like(out)))
        try:
            lp = torch.stack(_generate(eager["fn"], eager["cache"], prompt, len(force), force)["logits"])
        finally:
            hook.remove()
        first = next(i for i, (x, y) in enumerate(zip(got, ref)) if x != y)
        comp["agree"] = f"no ({sum(x == y for x, y in zip(got, ref))}/{len(ref)}, first differs at step {first})"
        comp["forced"] = (f"teacher-forced argmax agreement {int((lc.argmax(-1) == le.argmax(-1)).sum())}/{len(le)}, "
                          f"max |dlogits| compiled vs eager {(lc - le).abs().max().item():.2e}; eager vs eager "
                          f"with a 1e-7 input perturbation {(lp - le).abs().max().item():.2e}")
    print(f"  {info['variant']} {t}T: compiled greedy tokens == eager: {comp['agree']}"
          f"{'; ' + comp['forced'] if 'forced' in comp else ''}", flush=True)


def _print_row(v, mode, t, r, info):
    if "error" in r:
        print(f"  {v} {mode} {t}T: {r['error']}", flush=True)
        return
    rest = r["step_s"] - r["head_s"]
    bw = info["bytes"]["block"] / rest / 1e9 if rest > 0 else float("nan")
    print(f"  {v} {mode} {t}T: prefill {r['prefill_s'] * 1e3:.1f} ms, decode {r['tok_s']:.2f} tok/s "
          f"({r['step_s'] * 1e3:.2f} ms/token, lm_head {r['head_s'] * 1e3:.2f} ms, rest {rest * 1e3:.2f} ms = "
          f"{bw:.1f} GB/s of block weights); C++ kernel calls/token float {r['calls'][0]:g} int8 {r['calls'][1]:g}"
          f"{'; compile ' + r['compile'] if mode == 'compile' else ''}", flush=True)


def _reference(cfg, state, buffers, prompt, max_len, threads):
    """fp32 eager: its first generated token and the logits of the first decode step (fed that token)."""
    torch.set_num_threads(threads)
    model = _fresh(cfg, state, buffers)
    g = _generate(model.forward, _new_cache(model, max_len), prompt, 1)
    first = g["tokens"][0]
    step = _generate(model.forward, _new_cache(model, max_len), prompt, 1, force=[first])["logits"][1]
    del model
    return dict(first=first, logits=step)


def _llama_rows(a, cfg, state, buffers, infos):
    """The llama.cpp side-by-side section (--llama-cpp): GGUF files of the variants' weights, timed."""
    import tempfile

    import bench_llamacpp

    paths = bench_llamacpp._llama_cpp_paths(a.llama_cpp)
    work = tempfile.mkdtemp(prefix="cpu-decoder-gguf-")
    torch.set_num_threads(max(a.threads))
    rows = _llamacpp_rows.build(a, a.gguf, lambda v: _build(cfg, state, buffers, v, "fp32")[0], work)
    return _llamacpp_rows.cpu_lines(a, rows, _llamacpp_rows.time_prefill_decode(paths, rows, a, work), infos)


def main(argv=None):
    a = _parse(argv)
    from transformers import LlamaForCausalLM
    from paretoq_ao.export import cpu_backend
    argv_used = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python", "benchmarks/bench_cpu_decoder.py"] + argv_used)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    out = a.out or results_path(ROOT, "cpu-decoder", date)
    if any(_spec(v)["kind"] == "pq" for v in a.variants) and not cpu_backend.available():
        raise SystemExit("the ParetoQ C++ CPU kernels are not available; the packed variants would run the "
                         "PyTorch reference")
    threads_before = torch.get_num_threads()
    try:
        bw = dram_bandwidth(a.threads)
        print("DRAM read bandwidth (streaming read of 1 GiB, best of 5): " +
              ", ".join(f"{t}T {bw[t]:.1f} GB/s" for t in a.threads), flush=True)
        torch.manual_seed(a.seed)
        cfg = _config(a)
        src = LlamaForCausalLM(cfg).eval().float()
        state, buffers = src.state_dict(), dict(src.named_buffers())
        buffers = {k: b for k, b in buffers.items() if k not in state}
        del src
        n_block = sum(v.numel() for k, v in state.items() if ".layers." in k and k.endswith("proj.weight"))
        gen = torch.Generator().manual_seed(a.seed + 1)
        prompt = torch.randint(0, a.vocab, (a.prompt_len,), generator=gen).tolist()
        max_len = a.prompt_len + a.new_tokens + 1
        ref = _reference(cfg, state, buffers, prompt, max_len, a.threads[0])
        infos = {}
        for v in a.variants:
            infos[v] = _run_variant(v, cfg, state, buffers, a, prompt, max_len, ref)
        text = report(a, infos, bw, command, date, n_block)
        if a.llama_cpp:
            text += "\n".join(_llama_rows(a, cfg, state, buffers, infos)) + "\n"
    finally:
        torch.set_num_threads(threads_before)
    print(text)
    write_text(out, text)
    print("written", out, flush=True)
    return dict(out=out, text=text, infos=infos, bandwidth=bw)


if __name__ == "__main__":
    main()
