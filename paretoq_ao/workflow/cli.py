"""Command line: ``paretoq {qat,eval,convert,size,export,generate,demo}`` (also ``python -m paretoq_ao``).

Every command only parses flags and calls the Python API (``paretoq_ao.workflow.recipe``,
``paretoq_ao.evaluate``, ``paretoq_ao.hf``, ``paretoq_ao.generate``). Errors the user can fix
(unknown model, unreadable path, no linear layers, empty/too-short data, a checkpoint from other
settings, a full disk, a folder that is not a packed model, CUDA asked for but absent) are
reported as one line ``paretoq <command>: error: ...`` on stderr with exit status 1; bad flags
exit with status 2 (argparse).

    paretoq qat --model meta-llama/Llama-3.2-1B --bits 2 --pretrain-tokens 9e12 --output-dir run
    paretoq qat --model tiny --bits 2 --tokens 2e5 --save-every 50 --output-dir run   # offline
    paretoq convert run packed-2bit
    paretoq eval packed-2bit --data stdlib --tasks hellaswag,arc_easy
    paretoq size packed-2bit
    paretoq generate packed-2bit --prompt "def main():" --max-new-tokens 64 [--compile --threads 4]
    paretoq demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    pass


def _bits(s: str) -> float:
    from ..formats import get_format

    try:
        return get_format(float(s)).bits
    except (ValueError, KeyError) as e:
        raise argparse.ArgumentTypeError(f"bits must be 1, 1.58, 2, 3 or 4, got {s!r}") from e


def _number(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def _count(s: str) -> int:
    """A positive whole number, which may be written as 1e6 / 2.5e9."""
    v = _number(s)
    if not (v >= 1 and v == int(v)):
        raise argparse.ArgumentTypeError(f"must be a positive whole number (>= 1), got {s!r}")
    return int(v)


def _whole(s: str) -> int:
    """A whole number >= 0."""
    v = _number(s)
    if not (v >= 0 and v == int(v)):
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {s!r}")
    return int(v)


def _seed(s: str) -> int:
    v = _number(s)
    if not (v == int(v) and 0 <= v < 2 ** 63):
        raise argparse.ArgumentTypeError(f"must be a whole number in [0, 2**63), got {s!r}")
    return int(v)


def _positive(s: str) -> float:
    v = _number(s)
    if not (0 < v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s!r}")
    return v


def _non_negative(s: str) -> float:
    v = _number(s)
    if not (0 <= v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s!r}")
    return v


def _unit(s: str) -> float:
    v = _number(s)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {s}")
    return v


def _fraction(s: str) -> float:
    v = _number(s)
    if not (0 < v <= 1):
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s!r}")
    return v


def _grad_norm(s: str) -> Optional[float]:
    if s.strip().lower() == "none":
        return None
    v = _number(s)
    if not (0 < v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (or 'none' for no clipping), got {s!r}")
    return v


def _bits_type(s: str):
    """``BITS=TYPE`` of ``--weight-type`` -> (bits, TYPE); both are checked by export_gguf."""
    bits, sep, kind = s.partition("=")
    try:
        value = float(bits)
    except ValueError:
        value = None
    if not sep or not kind or value is None:
        raise argparse.ArgumentTypeError(f"expected BITS=TYPE (e.g. 2=Q2_K), got {s!r}")
    return (int(value) if value.is_integer() else value), kind.strip().upper()


def _json_dict(s: str) -> dict:
    try:
        d = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {s!r}") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return d


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate text with a packed model (model.generate) and time prefill/decode")
    g.add_argument("model", help="packed Hugging Face folder (paretoq convert), with its tokenizer")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_count, default=64, help="default 64 (fewer if EOS comes first)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (dynamic shapes); a short warm-up generate runs first, untimed")
    g.add_argument("--threads", type=_count, default=None, help="torch.set_num_threads (default: torch's)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--seed", type=_seed, default=None, help="torch.manual_seed before generating (with --sample)")


def _add_qat(sub) -> None:
    q = sub.add_parser("qat", help="quantization-aware training with the paper's recipe (resumable)")
    q.add_argument("--model", default="tiny", help='hub id, local folder, or "tiny" (small Llama from a config)')
    q.add_argument("--bits", type=_bits, default=2.0, help="1, 1.58, 2, 3 or 4 (default 2)")
    q.add_argument("--group-size", type=_count, default=None, help="scale per group of N inputs (default: per row)")
    q.add_argument("--data", default="stdlib", help='"stdlib" (offline), "fortunes" (Debian package), '
                   'a .txt/.jsonl file or folder, or a dataset name')
    q.add_argument("--text-field", default="text")
    q.add_argument("--max-chars", type=_count, default=None, help="use at most this much training text")
    q.add_argument("--block-size", type=_count, default=128)
    q.add_argument("--vocab-size", type=_count, default=1024, help="BPE vocabulary for --model tiny")
    q.add_argument("--tiny-config", type=_json_dict, default={}, help='LlamaConfig overrides for --model tiny, JSON')
    b = q.add_argument_group("budget (one of)")
    b.add_argument("--steps", type=_count, default=None, help="optimizer steps")
    b.add_argument("--tokens", type=_count, default=None, help="training tokens, e.g. 1e9")
    b.add_argument("--pretrain-tokens", type=_positive, default=None,
                   help="the model's pre-training token budget; QAT uses --token-fraction of it")
    b.add_argument("--token-fraction", type=_fraction, default=0.1, help="default 0.1 (the paper's ~10%%)")
    q.add_argument("--batch-size", type=_count, default=8)
    q.add_argument("--grad-accum", type=_count, default=1)
    q.add_argument("--lr", type=_positive, default=None, help="default: 2e-5 at 1/1.58/2 bits, 1e-5 at 3/4 bits")
    q.add_argument("--weight-decay", type=_non_negative, default=0.0)
    q.add_argument("--max-grad-norm", type=_grad_norm, default=1.0, help="> 0, or 'none' for no clipping (default 1)")
    q.add_argument("--bf16", action="store_true", help="bf16 autocast (master weights, scales and optimizer stay fp32)")
    q.add_argument("--compile", action="store_true", help="torch.compile the model")
    q.add_argument("--seed", type=_seed, default=0)
    q.add_argument("--device", default=None)
    q.add_argument("--output-dir", default="paretoq-qat")
    q.add_argument("--save-every", type=_whole, default=0, help="checkpoint every N steps (always at the end)")
    q.add_argument("--keep-last", type=_count, default=1)
    q.add_argument("--no-resume", action="store_true", help="refuse to continue an existing checkpoint")
    q.add_argument("--stop-after", type=_count, default=None, help="stop (and checkpoint) after this step")
    q.add_argument("--no-progress", action="store_true")
    k = q.add_argument_group("distillation from the full-precision model the QAT starts from")
    k.add_argument("--distill", action="store_true", help="loss = w * T^2 * KL(teacher || student) + (1 - w) * CE")
    k.add_argument("--distill-temperature", type=_positive, default=1.0, help="T (default 1)")
    k.add_argument("--distill-weight", type=_unit, default=1.0, help="w in [0, 1] (default 1: KL only)")
    m = q.add_argument_group("memory and multi-process (run under torchrun --nproc_per_node N for FSDP2)")
    m.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each transformer block in the backward pass (less memory, ~1/3 more compute)")
    m.add_argument("--checkpoint-format", choices=("auto", "dcp", "safetensors"), default="auto",
                   help="auto: torch.distributed.checkpoint (sharded) under torchrun, else safetensors")
    m.add_argument("--dist-timeout", type=_positive, default=600.0,
                   help="seconds a collective may wait before the job fails (default 600)")


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="held-out perplexity and lm-eval zero-shot tasks")
    e.add_argument("model", help="packed or QAT model folder, a qat --output-dir, or a hub id")
    e.add_argument("--data", default="stdlib", help='perplexity text (default "stdlib"); "none" to skip')
    e.add_argument("--split", default="validation")
    e.add_argument("--text-field", default="text")
    e.add_argument("--block-size", type=_count, default=128)
    e.add_argument("--max-chars", type=_count, default=None)
    e.add_argument("--max-blocks", type=_count, default=None)
    e.add_argument("--batch-size", type=_count, default=8)
    e.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks, e.g. hellaswag,arc_easy")
    e.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAML files")
    e.add_argument("--num-fewshot", type=_whole, default=None)
    e.add_argument("--limit", type=_positive, default=None,
                   help="examples per task (>= 1), or a fraction of each task (< 1)")
    e.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")


def _add_export(sub) -> None:
    x = sub.add_parser("export", help="export a packed Llama-family model to an ExecuTorch .pte (KV-cache decode "
                                      "step) or a GGUF file for llama.cpp")
    x.add_argument("model", help="packed Hugging Face folder (paretoq convert) or any Llama model path")
    x.add_argument("out", help=".pte or .gguf path (written atomically)")
    x.add_argument("--format", choices=("pte", "gguf"), default=None,
                   help="pte (ExecuTorch) or gguf (llama.cpp); default: from the extension of OUT, else pte")
    x.add_argument("--max-len", type=_count, default=None, help="pte: KV-cache length (default 256)")
    x.add_argument("--embedding-bits", type=int, choices=(4, 8), default=None,
                   help="pte: store the token embedding at 4 or 8 bits (group 32, ExecuTorch's quantized embedding "
                        "kernels); default: float32")
    x.add_argument("--activations", choices=("int8", "float"), default=None,
                   help="pte: int8 (default: dynamic per-token int8 activations, integer dot products, fastest) or "
                        "float (exactly the packed model); recorded in the program")
    x.add_argument("--attention", choices=("custom", "reference"), default=None,
                   help="pte: custom (default: ExecuTorch's llama::custom_sdpa / update_cache kernels, a step costs what "
                        "its position needs; an app links ExecuTorch's custom_ops) or reference (plain ops over the "
                        "whole KV cache, no extra kernels)")
    x.add_argument("--weight-order", choices=("blocked16", "rows"), default=None,
                   help="pte: blocked16 (default: each 16-row block of a packed weight stored as one sequential stream, "
                        "faster decode) or rows (the packed rows as they are)")
    x.add_argument("--embedding-type", type=str.upper, default=None,
                   help="gguf: type of the token embedding (default F16; F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0)")
    x.add_argument("--head-type", type=str.upper, default=None,
                   help="gguf: type of a full-precision output head (default F16; as --embedding-type)")
    x.add_argument("--weight-type", action="append", default=[], metavar="BITS=TYPE", type=_bits_type,
                   help="gguf: GGUF type for the packed layers of BITS bits (e.g. 1.58=TQ2_0, 2=Q4_0); repeatable; "
                        "default: the smallest type that holds them exactly (README)")


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="offline end-to-end demo: pre-train, QAT at 4/3/2/1.58/1 bits, table + plot")
    d.add_argument("--bits", default="4,3,2,1.58,1", help="comma-separated bit widths")
    d.add_argument("--pretrain-steps", type=_count, default=400)
    d.add_argument("--qat-fraction", type=_fraction, default=0.1)
    from .models import TINY_LLAMA as t

    for flag, default in (("--batch-size", 16), ("--block-size", 128), ("--vocab-size", 1024),
                          ("--max-chars", 1_500_000), ("--val-chars", 200_000), ("--eval-blocks", 64),
                          ("--hidden-size", t["hidden_size"]), ("--layers", t["num_hidden_layers"]),
                          ("--intermediate-size", t["intermediate_size"]), ("--heads", t["num_attention_heads"]),
                          ("--kv-heads", t["num_key_value_heads"])):
        d.add_argument(flag, type=_count, default=default)
    d.add_argument("--lr-scale", type=_positive, default=10.0, help="QAT LR = paper LR x this (tiny model)")
    d.add_argument("--group-size", type=_count, default=None)
    d.add_argument("--seed", type=_seed, default=0)
    d.add_argument("--out-dir", default="paretoq-demo", help="pareto.png (and --save-models) go here")
    d.add_argument("--save-models", action="store_true", help="save each packed model (hf.save_quantized)")
    d.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paretoq", description="ParetoQ 1/1.58/2/3/4-bit quantization (torchao backend)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_qat(sub)
    _add_eval(sub)
    c = sub.add_parser("convert", help="QAT checkpoint -> packed Hugging Face folder")
    c.add_argument("checkpoint", help="a qat --output-dir, a checkpoint-N folder, or a save_qat_checkpoint folder")
    c.add_argument("out", help="output folder")
    s = sub.add_parser("size", help="stored bytes per layer of a model")
    s.add_argument("model")
    _add_export(sub)
    _add_generate(sub)
    _add_demo(sub)
    return p


# --------------------------------------------------------------------------- commands

def _cmd_qat(a) -> None:
    from .settings import QATRecipe
    from .train import run_qat

    r = QATRecipe(model=a.model, bits=a.bits, group_size=a.group_size, data=a.data, text_field=a.text_field,
                  max_chars=a.max_chars, block_size=a.block_size, vocab_size=a.vocab_size,
                  model_config=a.tiny_config, steps=a.steps, tokens=a.tokens, pretrain_tokens=a.pretrain_tokens,
                  token_fraction=a.token_fraction, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
                  weight_decay=a.weight_decay, max_grad_norm=a.max_grad_norm, bf16=a.bf16, compile=a.compile,
                  seed=a.seed, device=a.device, output_dir=a.output_dir, save_every=a.save_every,
                  keep_last=a.keep_last, resume=not a.no_resume, stop_after=a.stop_after,
                  progress=not a.no_progress, activation_checkpointing=a.activation_checkpointing,
                  checkpoint_format=a.checkpoint_format, dist_timeout=a.dist_timeout, distill=a.distill,
                  distill_temperature=a.distill_temperature, distill_weight=a.distill_weight)
    from .distributed import group_is_up, shutdown, world_info

    # The process group is torn down at the end only if this command brought it up (run_qat joins
    # torchrun's group); a caller that initialised one before calling main() keeps it.
    owned = not group_is_up()
    try:
        res = run_qat(r)
        info = world_info()
        if info.is_main:
            last = f", last loss {res.losses[-1]:.4f}" if res.losses else ""
            resumed = f" (resumed at step {res.resumed_from})" if res.resumed_from is not None else ""
            ranks = f" on {info.world_size} ranks" if info.distributed else ""
            print(f"QAT {r.bits:g}-bit{ranks}: step {res.steps}/{res.total_steps}{resumed}, {res.tokens:,} tokens"
                  f"{last}; checkpoint {res.checkpoint}; log {res.log_path}")
            if res.steps == res.total_steps:
                print(f"convert with: paretoq convert {r.output_dir} <out-dir>")
    finally:
        if owned:
            shutdown()


def _load_for_eval(path: str):
    from .checkpoints import resolve_model_dir
    from .hf import load_model

    model, tok = load_model(resolve_model_dir(path))
    if tok is None:
        raise CLIError(f"model {path!r} has no tokenizer files; evaluation needs one")
    return model, tok


def _cmd_eval(a) -> None:
    from .evaluate import text_perplexity, zero_shot

    model, tok = _load_for_eval(a.model)
    results = {}
    if a.data.lower() != "none":
        ppl = text_perplexity(model, tok, a.data, a.split, a.block_size, a.max_chars, a.text_field,
                              a.batch_size, a.max_blocks)
        results["perplexity"] = ppl
        print(f"perplexity on {a.data}[{a.split}]: {ppl['ppl']:.3f} ({ppl['tokens']:,} tokens)")
    if a.tasks:
        limit = int(a.limit) if a.limit is not None and a.limit >= 1 else a.limit
        res = zero_shot(model, tok, a.tasks, include_path=a.include_path, num_fewshot=a.num_fewshot,
                        limit=limit, batch_size=1)
        results["tasks"] = res
        for task, metrics in res.items():
            vals = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            print(f"{task}: {vals}")
    if a.json_out:
        from ..serialization import atomic_write

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=2, default=str)

        atomic_write(a.json_out, write)


def _cmd_convert(a) -> None:
    from .convert import convert_checkpoint
    from ..size import model_size

    model = convert_checkpoint(a.checkpoint, a.out)
    rep = model_size(model)
    print(f"wrote packed model to {a.out}: {rep.total_bytes / 1e6:.3f} MB stored "
          f"({rep.quantized_bytes / 1e6:.3f} MB quantized linears)")


def _cmd_size(a) -> None:
    from ..size import model_size
    from .checkpoints import resolve_model_dir
    from .hf import load_model
    from .models import quantized_layer_count

    src = resolve_model_dir(a.model)
    model, _ = load_model(src, tokenizer=False)
    print(model_size(model))
    qat_layers = quantized_layer_count(model)
    if qat_layers:
        print(f"({src} is a QAT checkpoint: {qat_layers} layers hold float latent weights as "
              f"stored; `paretoq convert {a.model} <out>` packs them to their low-bit size)")


def _export_format(a) -> str:
    fmt = a.format or ("gguf" if str(a.out).lower().endswith(".gguf") else "pte")
    other = ({"--embedding-type": a.embedding_type, "--head-type": a.head_type, "--weight-type": a.weight_type}
             if fmt == "pte" else
             {"--max-len": a.max_len, "--embedding-bits": a.embedding_bits, "--activations": a.activations,
              "--attention": a.attention, "--weight-order": a.weight_order})
    given = [flag for flag, v in other.items() if v]
    if given:
        raise CLIError(f"{', '.join(given)} do(es) not apply to --format {fmt}")
    return fmt


def _cmd_export(a) -> None:
    from .checkpoints import is_qat_folder
    from .hf import load_model

    src = os.fspath(a.model)
    fmt = _export_format(a)
    if is_qat_folder(src):  # latent full-precision weights, nothing packed yet
        raise CLIError(f"{src!r} is a QAT checkpoint (latent weights, not packed); run "
                       f"`paretoq convert {src} <out>` first, then `paretoq export <out> {a.out}`")
    if fmt == "gguf":
        return _export_gguf(a, src, load_model)
    from ..export.llama import export_llama

    a.max_len = a.max_len or 256
    a.activations = a.activations or "int8"
    a.attention = a.attention or "custom"
    a.weight_order = a.weight_order or "blocked16"
    model, _ = load_model(src, tokenizer=False)
    changed = export_llama(model, a.out, max_len=a.max_len, embedding_bits=a.embedding_bits,
                           activations=a.activations, attention=a.attention,
                           weight_order=a.weight_order)["converted"]
    emb = f"; {a.embedding_bits}-bit embedding" if a.embedding_bits else ""
    conv = ""
    if changed:
        dtypes = "/".join(sorted({str(d).replace("torch.", "") for d in changed.values()}))
        conv = f"; {dtypes} scales and weights converted to float32 for the ExecuTorch kernels (codes unchanged)"
    print(f"wrote {a.out} (forward(ids [1, 1], pos [1]) -> logits; KV cache of {a.max_len} positions{emb}; "
          f"{a.activations} activations; {a.attention} attention; {a.weight_order} weight order{conv})")


def _cmd_generate(a) -> None:
    from .generate import generate

    if a.seed is not None:
        import torch

        torch.manual_seed(a.seed)
    res = generate(a.model, a.prompt, a.max_new_tokens, compile=a.compile, threads=a.threads, device=a.device,
                   do_sample=a.sample)
    print(res.text)
    print(res.summary())


def _export_gguf(a, src, load_model) -> None:
    from ..export.gguf import export_gguf

    model, tok = load_model(src)
    if tok is None:
        raise CLIError(f"{src!r} has no tokenizer files; llama.cpp needs the vocabulary")
    rep = export_gguf(model, tok, a.out, embedding_type=a.embedding_type or "F16",
                      head_type=a.head_type or "F16", weight_types=dict(a.weight_type))
    types = sorted({r["type"] for r in rep["tensors"].values()})
    print(f"wrote {a.out} ({rep['bytes'] / 2**20:.2f} MiB, {len(rep['tensors'])} tensors: {', '.join(types)}); "
          f"{'all exact' if not rep['inexact'] else str(len(rep['inexact'])) + ' nearest, not exact'}")
    for n in rep["inexact"]:
        r = rep["tensors"][n]
        print(f"  {n} ({r['source']}): {r['type']}, relative error {r['rel_error']:.2%}")


def _cmd_demo(a) -> None:
    from .demo import demo

    try:
        bits = [float(b) for b in a.bits.split(",") if b.strip()]
    except ValueError:
        raise CLIError(f"--bits must be comma-separated numbers, got {a.bits!r}") from None
    cfg = dict(hidden_size=a.hidden_size, num_hidden_layers=a.layers, intermediate_size=a.intermediate_size,
               num_attention_heads=a.heads, num_key_value_heads=a.kv_heads)
    out = demo(bits_list=bits, pretrain_steps=a.pretrain_steps, qat_fraction=a.qat_fraction,
               batch_size=a.batch_size, block_size=a.block_size, vocab_size=a.vocab_size, max_chars=a.max_chars,
               val_chars=a.val_chars, eval_blocks=a.eval_blocks, model_config=cfg, lr_scale=a.lr_scale,
               group_size=a.group_size, seed=a.seed, out_dir=a.out_dir, save_models=a.save_models,
               progress=not a.no_progress, log=lambda msg: print(msg, flush=True))
    print()
    print(out["table"])
    print(f"\nQAT used {a.qat_fraction:.0%} of the pre-training tokens at the paper's LR x {a.lr_scale:g}; "
          f"RTN = round-to-nearest post-training quantization of the same FP model.")
    if out["plot"]:
        print(f"Pareto plot: {out['plot']}")
    if out["files"]:
        print(f"table: {', '.join(out['files'])}")
    print(f"({out['seconds']:.0f}s)")


_COMMANDS = {"qat": _cmd_qat, "eval": _cmd_eval, "convert": _cmd_convert, "size": _cmd_size,
             "export": _cmd_export, "generate": _cmd_generate, "demo": _cmd_demo}


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError) and e.args:
        msg = str(e.args[0])
    return " ".join(part.strip() for part in msg.splitlines() if part.strip())


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns 0 on success, raises SystemExit(1) on an error (one line on stderr)."""
    args = build_parser().parse_args(argv)
    from .settings import CheckpointError, RecipeError

    try:
        _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"paretoq {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (CLIError, RecipeError, CheckpointError, ValueError, OSError, ImportError) as e:
        rank = os.environ.get("RANK") if "WORLD_SIZE" in os.environ else None
        where = f" (rank {rank})" if rank is not None else ""
        print(f"paretoq {args.command}: error{where}: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
