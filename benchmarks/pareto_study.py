"""The ParetoQ experiment in miniature: model size x bit width x method, at fixed token budgets.

    apt-get install fortunes                                # the second held-out corpus (Debian package)
    python benchmarks/pareto_study.py                       # the checked-in study: xs,s,m x 3 seeds (time: see results)
    python benchmarks/pareto_study.py --seeds 0 --sizes xs,s --no-distill   # one seed, quicker
    python benchmarks/pareto_study.py --tiny                # seconds-long smoke run

For every seed (``--seeds``, default 0,1,2; a seed fixes the FP initialisation and batch order and the
QAT batch order) and model size (small Llama configs, ``paretoq_ao.recipe.tiny_llama``) the script
pre-trains a full-precision model on the Python standard library's sources (``recipe.train_steps``)
and then, for every bit width, compares on the same held-out blocks (``evaluate.perplexity``) of two
corpora: the stdlib validation split, and a second corpus that no model trains on
(``--second-corpus``, default ``fortunes``: the English texts of Debian's ``fortunes`` package, see
``paretoq_ao.data``; 64 blocks spread evenly over it, the same tokenizer):

* **ParetoQ QAT** -- ``recipe.run_qat`` (ParetoQQATConfig, the paper's recipe) starting from the FP
  model, converted with ``recipe.to_packed`` (real packed codes + learned scales);
* **ParetoQ QAT + distill** -- the same run with ``QATRecipe(distill=True)``: KL of the student's token
  distribution to the FP model it starts from (T = 1, weight 1), same budget, LR and batches;
* **RTN** -- ``ParetoQWeightOnlyConfig`` applied directly to the FP model (post-training, no data);
* **torchao QAT** -- torchao's own ``QATConfig(IntxFakeQuantizeConfig(torch.intN, per_channel,
  is_symmetric=True, range_learning=True, is_dynamic=False), step="prepare")`` with
  ``torchao.quantization.qat.initialize_fake_quantizers`` before the optimizer is built, trained with
  the same loop, LR, batches and token budget; evaluated as the fake-quantized model. Its grid at N bits
  is the symmetric integer grid {-2^(N-1) .. 2^(N-1)-1} * scale, so 2/3/4 bits only: 1.58 bits has no
  torchao config and torch.int1 symmetric would be the grid {-1, 0} * s, not binary -- both n/a.

Pre-training hyperparameters (FP only; QAT is untouched). AdamW, no weight decay, grad-norm clip 1.0,
linear warm-up over ``--pretrain-warmup`` (default 7 %) of the steps, then cosine to zero, and a
per-size LR rule

    lr(size) = --pretrain-lr-base * (64 / hidden_size) ** --pretrain-lr-exp     (defaults 6e-3, 1.5)

i.e. xs (width 64) 6e-3, s (128) 2.1e-3, m (192) 1.15e-3, xxs (32) 1.7e-2 (untuned; only the smoke run
uses it). ``--pretrain-lr X`` restores one LR for every size. Why: with the earlier single LR of 3e-3
and no warm-up, s (816k params) ended at held-out ppl 76-78, worse than xs (224k) at 58.6. It was not
over-fitting -- s's training perplexity was worse too (33 vs 22) -- but an LR too large for its width
without warm-up. A sweep at the default budget (720 steps, 16 x 128 tokens, 1.5M chars of stdlib =
539k training tokens, seed 0; held-out ppl, no warm-up / 50-step (7 %) warm-up):

    xs: 1e-3 78.5 / 79.5   2e-3 60.5 / 62.8   3e-3 58.6 / 57.4   6e-3 62.2 / 52.6   1e-2   -  / 61.0
    s:  1e-3 53.4 / 52.3   2e-3 48.9 / 47.6   3e-3 78.0 / 48.6   4e-3   -  / 52.7   6e-3 88.1 / 84.5
    m:  5e-4   -  / 56.8   1e-3   -  / 45.7   2e-3   -  / 48.9

The best LR falls with width about as width^-1.5 (6e-3, 2e-3, 1e-3), hence the rule; warm-up is what
lets s survive 3e-3 (78.0 -> 48.6) and gives xs its best point at 6e-3. Gradient clipping is not the
culprit (s at 3e-3 without warm-up and without clipping: 69.6; under the rule the 1.0 clip acts on
3-33 % of s's steps and on most of m's, median grad norm up to 1.4 -- with Adam a near-uniform rescale).
A second seed under the rule keeps the order (seed 1: xs 52.2, s 50.9, m 47.4), but the xs-s gap is
within seed noise (s: 47.6 at seed 0, 50.9 at seed 1). More steps are not the fix at this data size: at 1440 steps
(5.5 epochs of the 539k tokens) under the rule, s reaches 37.9 but m only 40.6 -- m's held-out ppl
bottoms out at 39.8 around step 960 and then rises while its training ppl falls to 7 (memorisation),
so the size order flips. Doubling the data at 720 steps (``--max-chars 3000000``, a different
tokenizer so the numbers are not comparable with the above) keeps the order (xs 43.3, s 40.4, m 39.1)
without widening the gaps, so the default data and the default 720 steps are kept.

QAT budget: the paper's split. ``--pretrain-steps`` P is 90 % of a total budget T = P / 0.9; QAT gets
the other 10 % (P / 9 steps, same batch and block size). QAT LR = paper LR (2e-5 at <= 2 bits, 1e-5 at
3/4 bits) x ``--lr-scale`` (as ``recipe.demo``: a tiny model trained for seconds needs larger steps).

Ablations (on the first size only, to keep the default run short):

* **SEQ vs LSQ** at 2 bits and ternary. LSQ here is a local autograd function (``_LSQ``): forward
  clamp(round(W / alpha), Qn, Qp) * alpha with a grid that contains zero -- {-2, -1, 0, 1} * alpha at
  2 bits (the 3/4-bit style grid, the same levels as torchao's int2) and {-1, 0, 1} * alpha at ternary
  -- masked straight-through weight gradient and the LSQ scale gradient (level - ratio inside, Qn / Qp
  outside, gradient scale 1 / sqrt(numel * Qp)), exactly the estimator ParetoQ uses at 3/4 bits. Alpha
  is one per row, initialised with LSQ's 2 * mean|W| / sqrt(Qp) (max|W| / Qp would round most weights
  of a 2-bit zero-containing grid to zero). It is attached with ``torch.nn.utils.parametrize`` and
  trained with the same loop / LR / budget as the SEQ (= ParetoQ QAT) row.
* **Budget split** at 2 bits of the fixed total T: 90/10 (the main row), 70/30 (a separate FP
  pre-training of 0.7 T, then 0.3 T of ParetoQ QAT) and 100/0 (FP for all of T, then RTN). Each FP
  pre-training uses the size's rule LR and warms up over the same fraction of its own steps.

Sizes reported ("linears MB") are the stored bytes of the quantized block linears (codes + scales).
torchao / LSQ rows store the same code width and one fp32 scale per row (symmetric, no zero point), so
they are given the ParetoQ row's bytes at the same bits.

Output: ``<results-dir>/pareto-<date>.md`` and ``.png`` (written atomically; an earlier run of the same
day is kept, the new files get ``-2``, ...), plus a JSON copy of the per-seed numbers. The Markdown
holds the exact command line, the machine, the runtime, the tables (mean ± sd over the seeds), the
distillation table, and the paper's claims per corpus: a difference counts only where its paired 95 %
interval over the seeds excludes zero (``_pareto_claims.py``); the plot has error bars.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _meta import write_text  # noqa: E402  (benchmarks/_meta.py)
from _pareto_claims import DISTILL, _fmt  # noqa: E402  (the verdicts: benchmarks/_pareto_claims.py)
from _pareto_report import plot, to_markdown  # noqa: E402  (the Markdown and the plot)
from paretoq_ao.formats import get_format
from paretoq_ao.recipe import TINY_LLAMA, QATRecipe, paper_lr, run_qat, tiny_llama, to_packed, train_steps

SIZES = {
    "xxs": dict(hidden_size=32, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1),
    "xs": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2),
    "s": dict(TINY_LLAMA),  # the recipe's tiny model
    "m": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
              num_key_value_heads=2),
}
# FP pre-training LR rule (see "Pre-training hyperparameters" in the module docstring):
#   lr(size) = PRETRAIN_LR_BASE * (PRETRAIN_LR_WIDTH / hidden_size) ** PRETRAIN_LR_EXP
# -> xxs 1.7e-2, xs 6.0e-3, s 2.1e-3, m 1.15e-3; linear warm-up over PRETRAIN_WARMUP of the steps.
PRETRAIN_LR_BASE = 6e-3
PRETRAIN_LR_WIDTH = 64
PRETRAIN_LR_EXP = 1.5
PRETRAIN_WARMUP = 0.07
METHODS = ("ParetoQ QAT", DISTILL, "RTN", "torchao QAT")
TORCHAO_BITS = {2: "int2", 3: "int3", 4: "int4"}


# --------------------------------------------------------------------------- helpers

def pretrain_lr(size: str, base: float = PRETRAIN_LR_BASE, exp: float = PRETRAIN_LR_EXP) -> float:
    """The FP pre-training LR of ``size`` under the per-size rule base * (64 / hidden_size) ** exp."""
    return base * (PRETRAIN_LR_WIDTH / SIZES[size]["hidden_size"]) ** exp


def warmup_steps(steps: int, fraction: float) -> int:
    """Linear warm-up steps for a pre-training of ``steps`` steps (``fraction`` of them, rounded)."""
    return min(steps, max(0, round(fraction * steps)))


def _size_lr(args, size: str) -> float:
    if args.pretrain_lr is not None:  # one LR for every size (the study before the per-size rule)
        return args.pretrain_lr
    return pretrain_lr(size, args.pretrain_lr_base, args.pretrain_lr_exp)


def _block_linear_filter(model):
    from paretoq_ao import output_head_names

    heads = output_head_names(model)
    return lambda m, fqn: isinstance(m, nn.Linear) and fqn not in heads


def _linear_mb(model) -> float:
    from paretoq_ao.size import model_size

    return sum(l.total_bytes for l in model_size(model).layers if l.bits is not None) / 1e6


def _fp_linear_mb(model) -> float:
    from paretoq_ao.workflow.demo import fp_size_mb

    return fp_size_mb(model)[1]


def _ppl(model, val) -> float:
    from paretoq_ao.evaluate import perplexity

    return float(perplexity(model, val)["ppl"])


def _sampler(blocks, batch_size, seed):
    from paretoq_ao.data import BlockSampler

    return BlockSampler(blocks, batch_size, seed=seed)


class _LSQ(torch.autograd.Function):
    """LSQ with a zero-containing integer grid [qn, qp] (ablation; see the module docstring)."""

    @staticmethod
    def forward(ctx, w, alpha, qn, qp):
        a = alpha.clamp_min(1e-5)
        ratio = w / a
        ctx.save_for_backward(w, alpha)
        ctx.q = (qn, qp)
        return torch.round(ratio).clamp(qn, qp) * a

    @staticmethod
    def backward(ctx, g):
        w, alpha = ctx.saved_tensors
        qn, qp = ctx.q
        a = alpha.clamp_min(1e-5)
        ratio = w / a
        inside = (ratio >= qn) & (ratio <= qp)
        gw = g * inside.to(g.dtype)
        per = torch.where(ratio < qn, float(qn),
                          torch.where(ratio > qp, float(qp), torch.round(ratio).clamp(qn, qp) - ratio))
        ga = (per * g).sum(dim=1, keepdim=True) / math.sqrt(w.numel() * qp)
        return gw, ga, None, None


class _LSQParam(nn.Module):
    def __init__(self, weight: torch.Tensor, qn: int, qp: int):
        super().__init__()
        self.qn, self.qp = qn, qp
        init = 2 * weight.detach().abs().mean(dim=1, keepdim=True) / math.sqrt(qp)
        self.alpha = nn.Parameter(init.clone())

    def forward(self, w):
        return _LSQ.apply(w, self.alpha, self.qn, self.qp)


def _apply_lsq(model, bits) -> None:
    import torch.nn.utils.parametrize as P

    qn, qp = {2: (-2, 1), 1.58: (-1, 1)}[get_format(bits).bits]
    keep = _block_linear_filter(model)
    for name, mod in list(model.named_modules()):
        if keep(mod, name):
            P.register_parametrization(mod, "weight", _LSQParam(mod.weight, qn, qp))


def _apply_torchao_qat(model, bits, example) -> None:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig, initialize_fake_quantizers

    dtype = getattr(torch, TORCHAO_BITS[int(bits)])
    cfg = IntxFakeQuantizeConfig(dtype, "per_channel", is_symmetric=True, range_learning=True,
                                 is_dynamic=False)
    quantize_(model, QATConfig(weight_config=cfg, step="prepare"), filter_fn=_block_linear_filter(model))
    initialize_fake_quantizers(model, (example,))


# --------------------------------------------------------------------------- the study

class _Study:
    """What every stage of ``run_study`` shares: the data, the budget, the current seed, the results so far.

    (A plain class, not a dataclass: tests load this script with ``spec_from_file_location`` without
    registering it in ``sys.modules``, which ``@dataclass`` needs under postponed annotations.)
    """

    def __init__(self, args, data: Dict, t0: float, log: Callable):
        self.args, self.tok, self.train_blocks = args, data["tok"], data["train"]
        self.val, self.val2 = data["val"], data.get("val2")
        self.t0, self.log = t0, log
        self.seed = args.seeds[0]
        self.rows: List[Dict] = []
        self.ablation: List[Dict] = []
        self.pre_hp: Dict[str, Dict] = {}
        self.pretrain_steps = args.pretrain_steps
        self.total = self.pretrain_steps / 0.9  # total budget T in steps; main split 90/10
        self.qat_steps = max(1, round(0.1 * self.total))
        self.tok_per_step = args.batch_size * args.block_size

    def elapsed(self) -> str:
        return f"{time.time() - self.t0:.0f}s"

    def pretrain(self, size, steps):
        args = self.args
        lr, warm = _size_lr(args, size), warmup_steps(steps, args.pretrain_warmup)
        m = tiny_llama(len(self.tok), seed=self.seed, **SIZES[size])
        train_steps(m, _sampler(self.train_blocks, args.batch_size, self.seed), steps, lr, warmup_steps=warm,
                    progress=args.progress, desc="pre-train FP")
        self.pre_hp.setdefault(size, dict(lr=lr, warmup_steps=warm, steps=steps))
        return m

    def qat_lr(self, bits):
        return paper_lr(bits) * self.args.lr_scale

    def paretoq_qat(self, fp, bits, steps, distill: bool = False):
        """ParetoQ QAT from a copy of ``fp`` (with ``distill``: KL to ``fp`` itself, T = 1, weight 1), packed."""
        args = self.args
        m = copy.deepcopy(fp)
        r = QATRecipe(model="<study>", bits=bits, block_size=args.block_size, batch_size=args.batch_size,
                      steps=steps, lr=self.qat_lr(bits), seed=self.seed + 1, output_dir=None,
                      progress=args.progress, distill=distill)
        run_qat(r, model=m, tokenizer=self.tok, train_blocks=self.train_blocks)
        to_packed(m)
        return m

    def plain_qat(self, m, bits, steps):  # same loop / LR / batches (sampler seed) as run_qat
        args = self.args
        train_steps(m, _sampler(self.train_blocks, args.batch_size, self.seed + 1), steps, self.qat_lr(bits),
                    progress=args.progress, desc=f"QAT {bits:g}-bit")
        return m

    def scores(self, model) -> Dict:
        """{"ppl": held-out stdlib ppl, "ppl2": second-corpus ppl or None} of ``model``."""
        return dict(ppl=_ppl(model, self.val), ppl2=None if self.val2 is None else _ppl(model, self.val2))

    def add(self, model, **row) -> Dict:
        """Append a main-grid row for ``model`` (scored now unless ``row`` has ``ppl``) at the current seed."""
        r = dict(row, seed=self.seed)
        if "ppl" not in r:
            r.update(self.scores(model))
        self.rows.append(r)
        return r

    def add_ablation(self, **row) -> None:
        self.ablation.append(dict(row, seed=self.seed))

    def main_row(self, size, bits) -> Optional[Dict]:
        """The size's ParetoQ QAT row at ``bits`` for the current seed, if it was run."""
        return next((r for r in self.rows if r["size"] == size and r["bits"] == bits and r["seed"] == self.seed
                     and r["method"] == "ParetoQ QAT"), None)


def _rtn(fp, bits):
    """A copy of ``fp`` with ParetoQ's post-training round-to-nearest applied (no data)."""
    from torchao.quantization import quantize_

    from paretoq_ao.packed import ParetoQWeightOnlyConfig

    m = copy.deepcopy(fp)
    quantize_(m, ParetoQWeightOnlyConfig(bits=bits))
    return m


def _package_version(name: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "version unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "version unknown"


def _second_corpus(args, tok) -> Optional[Dict]:
    """The second held-out corpus (``--second-corpus``): its blocks and how to describe it, or None."""
    from paretoq_ao.data import PackedBlocks, load_texts, tokenize

    src = args.second_corpus
    if src == "none":
        return None
    texts = load_texts(src, "all")
    blocks = PackedBlocks(tokenize(texts, tok), args.block_size, source=src)
    if src == "fortunes":
        desc = (f"`fortunes` -- the English texts of Debian's `fortunes` package ({_package_version('fortunes')}; "
                f"fortune-mod's quotations, literature, humour and definitions), {len(texts):,} fortunes, "
                f"{sum(map(len, texts)):,} characters")
        name = "fortunes"
    else:
        desc, name = f"`{src}`, {len(texts):,} documents, {sum(map(len, texts)):,} characters", os.path.basename(src)
    val = blocks.evenly_spaced(args.eval_blocks)
    return dict(name=name, description=desc, tokens=blocks.blocks.numel(), blocks=val.shape[0], val=val)


def _load_study_data(args) -> Dict:
    """The tokenizer, train blocks and held-out blocks (stdlib), and the second corpus (or None)."""
    from paretoq_ao.data import PackedBlocks, load_texts, tokenize, train_tokenizer

    texts = load_texts("stdlib", "train", max_chars=args.max_chars)
    tok = train_tokenizer(texts, args.vocab_size)
    train_blocks = PackedBlocks(tokenize(texts, tok), args.block_size, source="stdlib[train]")
    val_texts = load_texts("stdlib", "validation", max_chars=args.val_chars)
    val = PackedBlocks(tokenize(val_texts, tok), args.block_size, source="stdlib[validation]").blocks
    second = _second_corpus(args, tok)
    return dict(tok=tok, train=train_blocks, val=val[: args.eval_blocks], second=second,
                val2=None if second is None else second.pop("val"))


def _study_fp(st: _Study, size):
    """Pre-train the FP model of ``size`` and record its row; returns (model, parameter count)."""
    fp = st.pretrain(size, st.pretrain_steps)
    n_params = sum(p.numel() for p in fp.parameters())
    hp = st.pre_hp[size]
    r = st.add(fp, size=size, params=n_params, bits=None, method="FP", linear_mb=_fp_linear_mb(fp),
               pretrain_lr=hp["lr"], warmup_steps=hp["warmup_steps"])
    st.log(f"[{size} seed {st.seed}] {n_params:,} params, FP ppl {r['ppl']:.2f} (LR {hp['lr']:.3g}, "
           f"{hp['warmup_steps']} warm-up steps; {st.elapsed()})")
    return fp, n_params


def _study_bits(st: _Study, size, fp, n_params, b) -> None:
    """The ParetoQ QAT (plain and distilled), RTN and torchao QAT rows of ``size`` at ``b`` bits."""
    cell = dict(size=size, params=n_params, bits=b)
    m = st.paretoq_qat(fp, b, st.qat_steps)
    qmb = _linear_mb(m)
    got = [st.add(m, method="ParetoQ QAT", linear_mb=qmb, **cell)]
    del m
    if not st.args.no_distill:
        m = st.paretoq_qat(fp, b, st.qat_steps, distill=True)
        got.append(st.add(m, method=DISTILL, linear_mb=qmb, **cell))
        del m
    m = _rtn(fp, b)
    got.append(st.add(m, method="RTN", linear_mb=_linear_mb(m), **cell))
    del m
    if b in TORCHAO_BITS:
        m = copy.deepcopy(fp)
        _apply_torchao_qat(m, b, st.val[:2])
        st.plain_qat(m, b, st.qat_steps)
        got.append(st.add(m, method="torchao QAT", linear_mb=qmb, **cell))
        del m
    else:  # n/a: torchao has no ternary / binary config
        got.append(st.add(None, method="torchao QAT", linear_mb=qmb, ppl=None, ppl2=None, **cell))
    st.log(f"[{size} seed {st.seed}] {b:g}-bit: " + ", ".join(f"{r['method']} {_fmt(r['ppl'])}" for r in got)
           + f" ({st.elapsed()})")


def _ablation_grid(st: _Study, size, fp) -> None:
    """SEQ (ParetoQ) vs LSQ with a zero-containing grid at <= 2 bits."""
    for b in (2, 1.58):
        seq = st.main_row(size, b)
        if seq is None:
            m = st.paretoq_qat(fp, b, st.qat_steps)
            seq = dict(linear_mb=_linear_mb(m), **st.scores(m))
            del m
        m = copy.deepcopy(fp)
        _apply_lsq(m, b)
        st.plain_qat(m, b, st.qat_steps)
        lsq = st.scores(m)
        del m
        st.add_ablation(study="grid", size=size, bits=b, variant="SEQ (ParetoQ)", ppl=seq["ppl"], ppl2=seq["ppl2"],
                        linear_mb=seq["linear_mb"])
        st.add_ablation(study="grid", size=size, bits=b, variant="LSQ (grid with 0)", linear_mb=seq["linear_mb"],
                        **lsq)
        st.log(f"[{size} seed {st.seed}] ablation {b:g}-bit: SEQ {seq['ppl']:.2f} vs LSQ {lsq['ppl']:.2f}")


def _ablation_split(st: _Study, size, fp) -> None:
    """Budget split of the fixed total T at 2 bits: 90/10, 70/30 and 100/0 (FP, then RTN)."""
    P, total, qat_steps = st.pretrain_steps, st.total, st.qat_steps
    main = st.main_row(size, 2)
    if main is None:
        m = st.paretoq_qat(fp, 2, qat_steps)
        main = dict(linear_mb=_linear_mb(m), **st.scores(m))
        del m
    st.add_ablation(study="split", size=size, bits=2, variant=f"90/10 ({P} FP + {qat_steps} QAT steps)",
                    ppl=main["ppl"], ppl2=main["ppl2"], linear_mb=main["linear_mb"])
    fp_steps = max(1, round(0.7 * total))
    fp70 = st.pretrain(size, fp_steps)
    m = st.paretoq_qat(fp70, 2, max(1, round(total) - fp_steps))
    st.add_ablation(study="split", size=size, bits=2,
                    variant=f"70/30 ({fp_steps} FP + {round(total) - fp_steps} QAT steps)",
                    linear_mb=_linear_mb(m), **st.scores(m))
    del m, fp70
    fp100 = st.pretrain(size, round(total))
    m = _rtn(fp100, 2)
    st.add_ablation(study="split", size=size, bits=2, variant=f"100/0 ({round(total)} FP steps, RTN)",
                    linear_mb=_linear_mb(m), **st.scores(m))
    del m, fp100
    st.log(f"[{size} seed {st.seed}] split: " + ", ".join(f"{a['variant']} {a['ppl']:.2f}" for a in st.ablation[-3:])
           + f" ({st.elapsed()})")


def run_study(args, log=print) -> Dict:
    t0 = time.time()
    data = _load_study_data(args)
    st = _Study(args=args, data=data, t0=t0, log=log)
    total, qat_steps = st.total, st.qat_steps
    sec = data["second"]
    log(f"data: {len(st.train_blocks)} train blocks, {st.val.shape[0]} held-out blocks of {args.block_size}"
        + (f", {sec['blocks']} of {sec['name']}" if sec else "")
        + f"; T = {total:.0f} steps = {total * st.tok_per_step:,.0f} tokens; FP {st.pretrain_steps} steps, "
        f"QAT {qat_steps} steps; seeds {args.seeds}")
    for seed in args.seeds:
        st.seed = seed
        torch.manual_seed(seed)
        for si, size in enumerate(args.sizes):
            fp, n_params = _study_fp(st, size)
            for bits in args.bits:
                _study_bits(st, size, fp, n_params, get_format(bits).bits)
            if si == 0 and not args.no_ablation:
                _ablation_grid(st, size, fp)
                _ablation_split(st, size, fp)
            del fp
    return dict(rows=st.rows, ablation=st.ablation, seconds=time.time() - t0, qat_steps=qat_steps,
                total_steps=total, tokens_per_step=st.tok_per_step, pretrain=st.pre_hp, seeds=list(args.seeds),
                second_corpus=sec,
                pretrain_rule=None if args.pretrain_lr is not None else dict(
                    base=args.pretrain_lr_base, width=PRETRAIN_LR_WIDTH, exp=args.pretrain_lr_exp),
                pretrain_warmup=args.pretrain_warmup)


def _parse_bits(s: str):
    return [get_format(x).bits for x in s.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="xs,s,m", help=f"comma-separated from {','.join(SIZES)}")
    p.add_argument("--bits", default="4,3,2,1.58,1")
    p.add_argument("--pretrain-steps", type=int, default=720, help="FP steps = 90 %% of the total budget")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated; each repeats the whole study")
    p.add_argument("--second-corpus", default="fortunes",
                   help='second held-out corpus, never trained on: "fortunes" (Debian package), a local '
                        '.txt/.jsonl file or folder, or "none"')
    p.add_argument("--no-distill", action="store_true", help="leave out the distillation column")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run (tiny model and data)")
    p.add_argument("--results-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--max-chars", type=int, default=1_500_000)
    p.add_argument("--val-chars", type=int, default=200_000)
    p.add_argument("--eval-blocks", type=int, default=64)
    p.add_argument("--pretrain-lr", type=float, default=None,
                   help="one FP pre-training LR for every size (default: the per-size rule below)")
    p.add_argument("--pretrain-lr-base", type=float, default=PRETRAIN_LR_BASE,
                   help=f"per-size rule: LR = base * ({PRETRAIN_LR_WIDTH} / hidden_size) ** exp")
    p.add_argument("--pretrain-lr-exp", type=float, default=PRETRAIN_LR_EXP)
    p.add_argument("--pretrain-warmup", type=float, default=PRETRAIN_WARMUP,
                   help="linear warm-up over this fraction of each FP pre-training's steps, then cosine")
    p.add_argument("--lr-scale", type=float, default=10.0)
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--progress", action="store_true", help="tqdm bars")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="no runs: write the Markdown and plot again from a study's JSON (with the settings given "
                        "here, which must be the run's), next to it")
    return p


TINY_DEFAULTS = {"--sizes": "xxs,xs", "--pretrain-steps": 9, "--batch-size": 4, "--block-size": 32,
                 "--vocab-size": 300, "--max-chars": 150_000, "--val-chars": 30_000, "--eval-blocks": 8,
                 "--seeds": "0"}


def _parse(argv: List[str]):
    p = _parser()
    args = p.parse_args(argv)
    if args.tiny:
        given = set(a.split("=")[0] for a in argv)
        for k, v in TINY_DEFAULTS.items():
            if k not in given:
                setattr(args, k[2:].replace("-", "_"), v)
    args.sizes = [s.strip() for s in str(args.sizes).split(",") if s.strip()]
    bad = [s for s in args.sizes if s not in SIZES]
    if bad:
        p.error(f"unknown size(s) {bad}; choose from {list(SIZES)}")
    args.bits = _parse_bits(args.bits)
    try:
        args.seeds = [int(x) for x in str(args.seeds).split(",") if x.strip()]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds needs at least one seed and no repeats, got {args.seeds}")
    if not 0 <= args.pretrain_warmup <= 1:
        p.error("--pretrain-warmup is a fraction of the pre-training steps, in [0, 1]")
    for name in ("batch_size", "block_size", "vocab_size", "max_chars", "val_chars", "eval_blocks", "pretrain_steps"):
        if getattr(args, name) < 1:  # refused here, not after data loading and minutes of pre-training
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.lr_scale > 0:
        p.error(f"--lr-scale must be positive, got {args.lr_scale}")
    if (args.pretrain_lr is not None and args.pretrain_lr <= 0) or args.pretrain_lr_base <= 0:
        p.error("pre-training LRs must be positive")
    if args.report is not None:
        try:
            with open(args.report, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            p.error(f"--report {args.report}: cannot read a study's JSON ({e})")
        if not isinstance(saved, dict) or not {"rows", "ablation", "seeds"} <= set(saved):
            p.error(f"--report {args.report}: not the JSON of a pareto_study run (no rows / ablation / seeds)")
        args._saved = saved
        return args
    if args.second_corpus != "none":  # before any training: a missing corpus fails now, not after the runs
        from paretoq_ao.data import load_texts

        try:
            load_texts(args.second_corpus, "all", max_chars=1)
        except (OSError, ValueError) as e:
            p.error(f"--second-corpus {args.second_corpus}: {e} (or pass --second-corpus none)")
    return args


def _results_stem(results_dir: str) -> str:
    """``<results_dir>/pareto-<date>``; an earlier run's files of the same day are kept (-2, -3, ...)."""
    base = os.path.join(results_dir, f"pareto-{datetime.date.today().isoformat()}")
    stem, n = base, 1
    while any(os.path.exists(stem + ext) for ext in (".md", ".json", ".png")):
        n += 1
        stem = f"{base}-{n}"
    return stem


def _report_stem(json_path: str) -> str:
    """Where ``--report`` writes: beside the JSON, never over an existing report (-report, -report-2, ...)."""
    base = json_path[:-5] if json_path.endswith(".json") else json_path
    stem, n = base, 1
    while any(os.path.exists(stem + ext) for ext in (".md", ".png")):
        n += 1
        stem = f"{base}-report" + (f"-{n - 1}" if n > 2 else "")
    return stem


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if args.report:
        res = args._saved
        for k in ("rows", "ablation"):  # JSON keeps no None-vs-missing distinction for bits; FP rows have None
            for r in res[k]:
                r["bits"] = r["bits"] if r["bits"] is None else get_format(r["bits"]).bits
        stem = _report_stem(args.report)
        command = res.get("argv") or ["python", "benchmarks/pareto_study.py"]
    else:
        os.makedirs(args.results_dir, exist_ok=True)
        stem = _results_stem(args.results_dir)
        res = run_study(args)
        command = res["argv"] = ["python", "benchmarks/pareto_study.py"] + argv
        write_text(stem + ".json", json.dumps(res, indent=1))
    args._png = stem + ".png"
    plot(res, args, stem + ".png")
    md = to_markdown(res, args, command)
    write_text(stem + ".md", md)
    print(md)
    print(f"wrote {stem}.md, {stem}.png" + ("" if args.report else f", {stem}.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
