"""The ParetoQ training recipe as a Python API, in one namespace (the CLI ``paretoq qat`` only parses flags and calls it).

    from paretoq_ao.recipe import QATRecipe, run_qat     # = paretoq_ao.workflow.recipe

    result = run_qat(QATRecipe(model="meta-llama/Llama-3.2-1B", bits=2,
                               pretrain_tokens=9e12, token_fraction=0.1, output_dir="run"))
    # or an explicit budget:  QATRecipe(..., tokens=50_000_000)  or  QATRecipe(..., steps=1000)

What ``run_qat`` does:

1. loads the full-precision model (hub id or local folder via ``paretoq_ao.hf.load_model``, or
   ``model="tiny"``: a small Llama built from a config, with a BPE tokenizer trained offline on the
   training text) -- or uses a model object passed in;
2. ``paretoq_ao.quantize(model, ParetoQQATConfig(bits, group_size))`` with the default filter (every block
   linear; embeddings and the output head stay full precision); a model with no such layer is an
   error;
3. trains with the paper's recipe: AdamW with zero weight decay, the scales in the same optimizer
   and LR, cosine decay to zero, no warmup, LR 2e-5 at 1 / 1.58 / 2 bits and 1e-5 at 3 / 4 bits
   (``lr=`` overrides), plain next-token cross-entropy; gradient accumulation, gradient clipping
   (1.0), optional bf16 autocast and ``torch.compile``. The budget is ``steps``, or ``tokens``, or
   ``token_fraction`` (paper: 0.1) of a stated ``pretrain_tokens``;
4. checkpoints every ``save_every`` optimizer steps (and at the end / at ``stop_after``) into
   ``output_dir/checkpoint-<step>/``: ``model/`` (``hf.save_qat_checkpoint``: latent weights,
   scales, config, tokenizer) and ``trainer_state.pt`` (optimizer, scheduler, data position,
   RNG states, step, and the settings). A checkpoint is built in a hidden folder, renamed into
   place, and only then named in ``output_dir/latest`` (written atomically); a failed save (disk
   full, ...) leaves the previous checkpoint and ``latest`` untouched. Re-running with the same
   settings resumes exactly: the resumed run's losses and parameters are bit-identical to an
   uninterrupted run's. A checkpoint made with other settings is refused, naming what differs;
5. distributed: under ``torchrun --nproc_per_node N`` (or with a process group already initialised)
   the same call joins the process group, shards the model with FSDP2
   (``paretoq_ao.distributed.shard_model``: each transformer block, then the root; optimizer state
   is sharded with the parameters), gives each rank ``batch_size / N`` rows of every global batch
   (``batch_size`` stays the global batch, so the run is the single-process run up to float
   summation order), averages the logged loss over ranks, and writes checkpoints with
   ``torch.distributed.checkpoint``: ``checkpoint-<step>/dcp/`` (sharded model + optimizer),
   ``model/`` (config, ``paretoq_qat.json``, tokenizer; no weights) and ``trainer_state.pt``. Such a
   checkpoint resumes on any number of ranks (one included) and ``paretoq convert``/``eval`` read it
   directly; a single-process checkpoint in the default format resumes on N ranks too.
   ``activation_checkpointing`` recomputes each block in the backward pass (with or without FSDP);
6. logs the curve to ``output_dir/log.jsonl`` (one JSON object per optimizer step, flushed
   line by line; a resumed run appends a ``{"event": "resume"}`` line; ``read_log`` keeps the last
   record of each step), and shows a tqdm bar with the loss and tokens/s.

The recipe lives in modules along its seams (this module only gathers their public names):
``settings`` (QATRecipe, QATResult, errors, file names), ``models`` (tiny Llama, base model, data),
``checkpoints`` (RNG, checkpoints, ``latest``, log), ``train`` (the loop), ``convert`` (QAT checkpoint ->
packed model), ``demo`` (the size/perplexity demo and its plot).
"""

from .checkpoints import latest_checkpoint, read_log, resolve_model_dir, resolve_qat_checkpoint
from .convert import convert_checkpoint, to_packed
from .demo import DemoRow, demo, format_table, fp_size_mb, plot_pareto, size_mb
from .models import TINY_LLAMA, quantized_layer_count, tiny_llama
from .settings import (
    LATEST_NAME, LOG_NAME, STATE_FORMAT, STATE_NAME, CheckpointError, QATRecipe, QATResult, RecipeError, paper_lr,
    resolve_steps,
)
from .train import qat, run_qat, train_steps

__all__ = [
    "QATRecipe", "QATResult", "RecipeError", "CheckpointError", "paper_lr", "tiny_llama", "TINY_LLAMA",
    "run_qat", "qat", "resolve_steps", "latest_checkpoint", "read_log", "convert_checkpoint",
    "quantized_layer_count", "demo", "DemoRow", "plot_pareto", "format_table", "size_mb", "fp_size_mb",
    "to_packed", "resolve_qat_checkpoint", "resolve_model_dir", "train_steps",
    "LATEST_NAME", "LOG_NAME", "STATE_NAME", "STATE_FORMAT",
]
