"""``paretoq demo``: pretrain a tiny model, QAT it at every bit width, plot size vs perplexity."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from .. import serialization
from ..formats import get_format
from .checkpoints import _write_text
from .convert import to_packed
from .models import _make_sampler, tiny_llama
from .settings import QATRecipe, paper_lr
from .train import run_qat, train_steps

_log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- demo

@dataclass
class DemoRow:
    label: str  # "full precision", "ParetoQ QAT", "RTN"
    bits: Optional[float]
    model_mb: float  # stored bytes of the whole model / 1e6
    linear_mb: float  # stored bytes of the block linears (packed codes + scales) / 1e6
    ppl: float


def size_mb(model) -> tuple:
    """(whole-model MB, MB of the quantized linears: codes + scales), as stored."""
    from ..size import model_size

    rep = model_size(model)
    lin = sum(l.total_bytes for l in rep.layers if l.bits is not None)
    return rep.total_bytes / 1e6, lin / 1e6


def plot_pareto(rows: List[DemoRow], path, title: str = "ParetoQ: size vs held-out perplexity") -> str:
    """Write a size-vs-perplexity plot (PNG, matplotlib Agg backend) atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    for label, marker in (("ParetoQ QAT", "o-"), ("RTN", "s--")):
        pts = sorted((r.linear_mb, r.ppl, r.bits) for r in rows if r.label == label)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=label)
            for x, y, b in pts:
                ax.annotate(f"{b:g}b", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for r in rows:
        if r.label == "full precision":
            ax.plot([r.linear_mb], [r.ppl], "k*", markersize=12, label="full precision")
    ax.set_xlabel("stored size of the quantized linear layers (MB, codes + scales)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        serialization.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return os.fspath(path)


def format_table(rows: List[DemoRow]) -> str:
    head = f"{'model':<16}{'bits':>6}{'model MB':>11}{'linears MB':>12}{'held-out ppl':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        bits = "32" if r.bits is None else f"{r.bits:g}"
        lines.append(f"{r.label:<16}{bits:>6}{r.model_mb:>11.3f}{r.linear_mb:>12.3f}{r.ppl:>14.2f}")
    return "\n".join(lines)


def demo(*, bits_list=(4, 3, 2, 1.58, 1), pretrain_steps: int = 400, qat_fraction: float = 0.1,
         batch_size: int = 16, block_size: int = 128, vocab_size: int = 1024, max_chars: int = 1_500_000,
         val_chars: int = 200_000, eval_blocks: int = 64, model_config: Optional[Dict[str, Any]] = None,
         pretrain_lr: float = 3e-3, lr_scale: float = 10.0, group_size: Optional[int] = None, seed: int = 0,
         out_dir: Optional[str] = "paretoq-demo", save_models: bool = False, progress: bool = True,
         log=print) -> Dict[str, Any]:
    """The ParetoQ workflow on a small model, offline: pre-train a small Llama on the standard
    library's sources in full precision, then for each bit width run QAT with ``qat_fraction`` of
    the pre-training tokens (paper: 10 %), convert to packed weights, and measure stored size and
    held-out perplexity next to round-to-nearest PTQ at the same bits.

    The QAT LR is the paper's LR times ``lr_scale``: the paper's 2e-5 / 1e-5 are for billion-parameter
    models trained for ~10B tokens; a tiny model trained for seconds needs a larger step.
    Returns {"rows": [DemoRow], "table": str, "plot": path or None, "seconds": float}."""
    import copy

    from .data import PackedBlocks, load_texts, tokenize, train_tokenizer
    from .evaluate import perplexity
    from .._targets import quantize
    from ..packed import ParetoQWeightOnlyConfig

    t0 = time.time()
    torch.manual_seed(seed)
    texts = load_texts("stdlib", "train", max_chars=max_chars)
    tok = train_tokenizer(texts, vocab_size)
    train_blocks = PackedBlocks(tokenize(texts, tok), block_size, source="stdlib[train]")
    val_texts = load_texts("stdlib", "validation", max_chars=val_chars)
    val_blocks = PackedBlocks(tokenize(val_texts, tok), block_size, source="stdlib[validation]")
    val = val_blocks.blocks[:eval_blocks]
    r0 = QATRecipe(block_size=block_size, batch_size=batch_size, steps=1)  # validates sizes
    sampler = _make_sampler(r0, train_blocks)
    fp = tiny_llama(len(tok), seed=seed, **(model_config or {}))
    log(f"demo: {sum(p.numel() for p in fp.parameters()):,} parameters, {len(train_blocks)} training blocks "
        f"of {block_size} tokens, {val.shape[0]} held-out blocks")
    # 7 % linear warm-up: without it LR 3e-3 diverges early on wider models (benchmarks/pareto_study.py sweep)
    train_steps(fp, sampler, pretrain_steps, pretrain_lr, progress=progress, desc="pre-train FP",
                warmup_steps=pretrain_steps * 7 // 100)
    pre_tokens = pretrain_steps * batch_size * block_size
    fp_mb, fp_lin = fp_size_mb(fp)
    rows = [DemoRow("full precision", None, fp_mb, fp_lin, perplexity(fp, val)["ppl"])]
    log(f"pre-trained: {pretrain_steps} steps, {pre_tokens:,} tokens, ppl {rows[0].ppl:.2f} "
        f"({time.time() - t0:.0f}s)")
    for bits in bits_list:
        rtn = copy.deepcopy(fp)
        quantize(rtn, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size))
        rtn_row = DemoRow("RTN", get_format(bits).bits, *size_mb(rtn), perplexity(rtn, val)["ppl"])
        del rtn
        model = copy.deepcopy(fp)
        r = QATRecipe(model="<demo>", bits=bits, group_size=group_size, block_size=block_size,
                      batch_size=batch_size, pretrain_tokens=pre_tokens, token_fraction=qat_fraction,
                      lr=paper_lr(bits) * lr_scale, seed=seed + 1, output_dir=None, progress=progress)
        res = run_qat(r, model=model, tokenizer=tok, train_blocks=train_blocks)
        to_packed(model)  # convert: packed low-bit codes + learned scales
        if save_models and out_dir:
            from .hf import save_quantized

            save_quantized(model, tok, os.path.join(out_dir, f"paretoq-{get_format(bits).bits:g}bit"))
        rows.append(DemoRow("ParetoQ QAT", get_format(bits).bits, *size_mb(model), perplexity(model, val)["ppl"]))
        rows.append(rtn_row)
        log(f"{bits:g}-bit: QAT {res.steps} steps ({res.tokens:,} tokens), ppl {rows[-2].ppl:.2f}; "
            f"RTN ppl {rtn_row.ppl:.2f} ({time.time() - t0:.0f}s)")
    table = format_table(rows)
    plot = files = None
    seconds = time.time() - t0
    if out_dir:
        plot = plot_pareto(rows, os.path.join(out_dir, "pareto.png"))
        files = _write_demo_tables(rows, out_dir, dict(
            bits=[get_format(b).bits for b in bits_list], pretrain_steps=pretrain_steps, qat_fraction=qat_fraction,
            batch_size=batch_size, block_size=block_size, vocab_size=vocab_size, group_size=group_size,
            lr_scale=lr_scale, seed=seed, model_config=dict(model_config or {}), seconds=round(seconds, 1)))
    return {"rows": rows, "table": table, "plot": plot, "files": files, "seconds": seconds}


def _write_demo_tables(rows: List[DemoRow], out_dir: str, settings: Dict[str, Any]) -> List[str]:
    """``pareto.md`` (the table) and ``pareto.json`` (rows + settings) next to the plot, atomically."""
    md = ["| model | bits | model MB | linears MB | held-out ppl |", "|---|---|---|---|---|"]
    md += [f"| {r.label} | {'32' if r.bits is None else f'{r.bits:g}'} | {r.model_mb:.3f} | {r.linear_mb:.3f} | "
           f"{r.ppl:.2f} |" for r in rows]
    md += ["", "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items())]
    doc = {"rows": [dataclasses.asdict(r) for r in rows], "settings": settings}
    paths = [os.path.join(out_dir, "pareto.md"), os.path.join(out_dir, "pareto.json")]
    for path, text in zip(paths, ("\n".join(md) + "\n", json.dumps(doc, indent=1) + "\n")):
        serialization.atomic_write(path, lambda p, t=text: _write_text(p, t))
    return paths


def fp_size_mb(model) -> tuple:
    """Whole-model MB and the MB of the layers the default filter would quantize, in full precision."""
    from ..size import model_size
    from .. import output_head_names

    rep = model_size(model)
    heads = output_head_names(model)
    lin = sum(l.total_bytes for l in rep.layers if l.name not in heads)
    return rep.total_bytes / 1e6, lin / 1e6
