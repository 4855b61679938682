"""The Markdown report of ``bench_cpu_decoder.py`` (its tables, targets and header)."""

from __future__ import annotations

import os
import platform
import resource

import torch

from _meta import cpu_model, git_commit

TARGET_EAGER, TARGET_COMPILE = 3.0, 2.0  # pq2 / pq2-i8 decode tok/s over fp32 eager / compiled


def rel_l2(x, ref):
    return float((x.float() - ref.float()).norm() / ref.float().norm())


def _fp32_tok_s(infos, mode, t):
    r = infos.get("fp32", {}).get("rows", {}).get((mode, t))
    return r["tok_s"] if r and "error" not in r else None


def _ratio(x, base):
    return f"{x / base:.2f}x" if base else "-"


def _calls_cell(sp, r):
    if sp["kind"] == "pq":
        return f"{r['calls'][1 if sp['acts'] == 'int8' else 0]:g} ({sp['acts']})"
    return f"{r['calls'][0] + r['calls'][1]:g}"


def _timing_table(a, infos, bw):
    hdr = ["variant", "mode", "threads", "compile", "warm-up s", "prefill ms", "decode tok/s", "ms/token", "lm_head ms",
           "rest ms", "block MB", "rest GB/s", "DRAM GB/s", "vs fp32 eager", "vs fp32 compiled",
           "C++ calls/token", "tokens = eager"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for v, info in infos.items():
        for t in a.threads:
            for mode in a.modes:
                r = info["rows"].get((mode, t))
                if r is None or "error" in r:
                    why = "n/a (error under Weights)" if r is None else r["error"]
                    lines.append("| " + " | ".join([v, mode, str(t), why] + ["-"] * (len(hdr) - 4)) + " |")
                    continue
                rest = r["step_s"] - r["head_s"]
                gbs = f"{info['bytes']['block'] / rest / 1e9:.1f}" if rest > 0 else "n/a"
                lines.append("| " + " | ".join([
                    v, mode, str(t), r["compile"], f"{r['warm_s']:.1f}", f"{r['prefill_s'] * 1e3:.1f}",
                    f"{r['tok_s']:.2f}",
                    f"{r['step_s'] * 1e3:.2f}", f"{r['head_s'] * 1e3:.2f}", f"{rest * 1e3:.2f}",
                    f"{info['bytes']['block'] / 1e6:.1f}", gbs, f"{bw[t]:.1f}",
                    _ratio(r["tok_s"], _fp32_tok_s(infos, "eager", t)),
                    _ratio(r["tok_s"], _fp32_tok_s(infos, "compile", t)),
                    _calls_cell(info["spec"], r), r.get("agree", "-")]) + " |")
    return lines


def _sizes_table(infos):
    hdr = ["variant", "block weights MB", "lm_head", "lm_head MB", "total MB", "build s",
           "logits rel L2 vs fp32", "argmax = fp32", "kernel path (q_proj, M=1) / note"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for v, info in infos.items():
        if "bytes" not in info:
            lines.append("| " + " | ".join([v] + ["-"] * (len(hdr) - 2) + [info["note"]]) + " |")
            continue
        b = info["bytes"]
        lines.append("| " + " | ".join([
            v, f"{b['block'] / 1e6:.1f}", info["head"], f"{b['head'] / 1e6:.1f}", f"{b['total'] / 1e6:.1f}",
            f"{info['quant_s']:.1f}", f"{info['rel_l2']:.3e}", "yes" if info["argmax_ok"] else "no",
            "; ".join(x for x in (info["plan"], info["note"]) if x) or "-"]) + " |")
    return lines


def _accuracy_lines(infos):
    parts = []
    for v in [v for v in infos if v.startswith("pq") and not v.endswith("-i8")]:
        f, i = infos[v], infos.get(f"{v}-i8", {})
        if "logits" in f and "logits" in i:
            parts.append(f"{v} {rel_l2(i['logits'], f['logits']):.3e} (vs fp32: float {f['rel_l2']:.3e}, "
                         f"int8 {i['rel_l2']:.3e})")
    if not parts:
        return []
    return ["int8 vs float activations: relative L2 of the logits (first decode step, pq<b>-i8 vs pq<b>, "
            "same packed weights): " + "; ".join(parts)]


def _target_lines(a, infos):
    lines = []
    for v in ("pq2", "pq2-i8"):
        for t in a.threads:
            for mode in a.modes:
                r = infos.get(v, {}).get("rows", {}).get((mode, t))
                if r is None or "error" in r:
                    continue
                cells = []
                for base_mode, target in (("eager", TARGET_EAGER), ("compile", TARGET_COMPILE)):
                    base = _fp32_tok_s(infos, base_mode, t)
                    if base:
                        x = r["tok_s"] / base
                        name = "compiled" if base_mode == "compile" else base_mode
                        cells.append(f"{x:.2f}x fp32 {name} (target >= {target:g}x: "
                                     f"{'PASS' if x >= target else 'MISS'})")
                if cells:
                    lines.append(f"- {v} {mode} {t}T: " + ", ".join(cells))
    return lines


def _kernel_threads() -> str:
    """How the C++ CPU kernels split rows over threads here ("openmp": torch.set_num_threads)."""
    from paretoq_ao.export import cpu_backend

    return (f"rows split over torch's threads by {cpu_backend.parallel_backend()}" if cpu_backend.available()
            else "unavailable")


def report(a, infos, bw, command, date, n_block):
    import torchao
    import transformers
    head = ("fp32 in every variant" if a.head == "fp32" else
            "ParetoQ 4-bit (ours) in every quantized variant, fp32 in the fp32 variant")
    lines = [f"# PyTorch CPU decoder benchmark ({date})", "",
             f"Command: `{command}`", "",
             f"Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.platform()}; torch {torch.__version__}, "
             f"torchao {torchao.__version__}, transformers {transformers.__version__}, python "
             f"{platform.python_version()}; git {git_commit() or 'unknown'}; date {date}; C++ kernels: "
             f"{_kernel_threads()}", "",
             f"Model: transformers LlamaForCausalLM, random weights (seed {a.seed}), hidden {a.hidden}, intermediate "
             f"{a.intermediate}, {a.layers} layers, {a.heads} heads / {a.kv_heads} KV heads, vocab {a.vocab}, "
             f"untied; {n_block / 1e6:.1f} M block-linear parameters; lm_head: {head}. Batch 1, StaticCache, manual "
             f"greedy loop `model(input_ids=token, cache=cache, logits_to_keep=1)`.",
             f"Timing: prompt {a.prompt_len} tokens (prefill ms), then {a.new_tokens} greedy decode steps (decode "
             f"tok/s = steps / loop time); one untimed warm-up generation, then the median of {a.reps} "
             "generation(s). compile = `torch.compile(model.forward, fullgraph=True, dynamic=False)`, compiled "
             "afresh per thread count (column `compile`: fullgraph, or the default when fullgraph failed). "
             "lm_head ms = the head alone on one hidden state in the same mode (median); rest = ms/token - "
             "lm_head; rest GB/s = block weight bytes / rest.",
             "DRAM read bandwidth (best streaming read of a 1 GiB buffer, the kernel library's loop or torch.sum, "
             "paretoq_ao.export.cpu_backend.read_bandwidth, best of 5, per thread count): " + "; ".join(
                 f"{t} thread(s) {bw[t]:.1f} GB/s" for t in a.threads),
             f"Peak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB "
             "(every variant shares the saved fp32 tensors and is freed after it is measured).",
             "C++ calls/token: calls of paretoq_ao's CPU kernels (`cpu_backend.call_count`) per decode step, "
             f"in the variant's activation mode (7 x {a.layers} block linears"
             f"{' + the head' if a.head == 'pq4' else ''} expected for ParetoQ).", "",
             "## Decode", ""]
    lines += _timing_table(a, infos, bw)
    lines += ["", "## Weights and accuracy", "",
              "Logits: the first decode step (prompt, then the fp32 model's first greedy token), eager, "
              f"{a.threads[0]} thread(s); relative L2 = ||logits - fp32 logits|| / ||fp32 logits||.", ""]
    lines += _sizes_table(infos)
    acc = _accuracy_lines(infos)
    if acc:
        lines += [""] + acc
    forced = [f"- {v} {t}T: {r['agree']}; {r['forced']}" for v, info in infos.items()
              for (m, t), r in info["rows"].items() if "forced" in r]
    if forced:
        lines += ["", "Compiled greedy tokens that differ from eager (the ops' float rounding differs between "
                  "eager and inductor; int8 activation rounding is discontinuous, so a 1e-7 change can move "
                  "logits; compare with eager's own sensitivity):", ""] + forced
    tl = _target_lines(a, infos)
    if tl:
        lines += ["", "## Targets (pq2, both activation modes: >= 3x fp32 eager, >= 2x fp32 compiled; "
                  "same thread count)", ""] + tl
    return "\n".join(lines) + "\n"
