"""The models and data a QAT run starts from: the tiny Llama of ``model="tiny"``, a hub or local
full-precision model, the training text and its blocks."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from .settings import LATEST_NAME, QATRecipe, RecipeError, _check_tiny_config

_log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- models and data

# The shape of the tiny model (``model="tiny"``, the demo, the example, the CLI's defaults).
TINY_LLAMA = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2)


def tiny_llama(vocab_size: int, seed: int = 0, **overrides) -> nn.Module:
    """A small Llama-style causal LM built from a config (random init, float32): ``TINY_LLAMA``
    with ``overrides`` (LlamaConfig keys)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=vocab_size, **TINY_LLAMA, max_position_embeddings=1024,
              tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    _check_tiny_config(overrides)
    kw.update(overrides)
    torch.manual_seed(seed)
    from huggingface_hub.errors import StrictDataclassError  # LlamaConfig's own validation

    try:
        cfg = LlamaConfig(**kw)
        return LlamaForCausalLM(cfg)
    except (TypeError, ValueError, RuntimeError, StrictDataclassError) as e:
        cause = e.__cause__ if isinstance(e, StrictDataclassError) and e.__cause__ else e
        raise RecipeError(f"invalid tiny model config {overrides}: {str(cause).strip().splitlines()[-1]}") from None


def quantized_layer_count(model: nn.Module) -> int:
    from ..qat import ParetoQQATWeight

    return sum(isinstance(m._parameters.get("weight"), ParetoQQATWeight) for m in model.modules())


def _fp32_master_weights(model: nn.Module) -> None:
    """Latent weights, scales (made from them) and so the optimizer state are float32, whatever
    dtype the checkpoint ships in: at the paper's LR of 2e-5 most bf16 updates would round away.
    ``bf16=True`` computes in bf16 under autocast; the master copy stays float32."""
    low = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if low:
        _log.info("QAT: %s parameters converted to float32 master weights", ", ".join(low))
        model.float()


def _apply_qat(model: nn.Module, r: QATRecipe) -> None:
    from .._targets import quantize
    from ..qat import ParetoQQATConfig

    try:
        quantize(model, ParetoQQATConfig(bits=r.bits, group_size=r.group_size))
    except ValueError as e:
        raise RecipeError(str(e).replace("\n  ", " | ")) from None
    if quantized_layer_count(model) == 0:
        raise RecipeError(f"model {r.model!r} ({type(model).__name__}) has no linear layers to quantize "
                          "(ParetoQ quantizes the nn.Linear layers of the transformer blocks; the output "
                          "head stays full precision)")


def _load_texts_or_fail(r: QATRecipe, split: str):
    from .data import load_texts

    try:
        texts = load_texts(r.data, split, text_field=r.text_field, max_chars=r.max_chars)
    except (OSError, ValueError) as e:
        raise RecipeError(f"data {r.data!r}: {e}") from None
    if not texts:
        raise RecipeError(f"data {r.data!r} (split {split!r}) holds no text")
    return texts


def build_train_blocks(r: QATRecipe, tokenizer):
    from .data import PackedBlocks, tokenize

    texts = _load_texts_or_fail(r, "train")
    try:
        return PackedBlocks(tokenize(texts, tokenizer), r.block_size, source=f"{r.data}[train]")
    except ValueError as e:
        raise RecipeError(str(e)) from None


def _make_sampler(r: QATRecipe, blocks, rank: int = 0, world_size: int = 1):
    from .data import BlockSampler

    if len(blocks) < r.batch_size:
        raise RecipeError(f"data {r.data!r} is too short: {len(blocks)} block(s) of {r.block_size} tokens, "
                          f"fewer than one batch of {r.batch_size}; use more text or a smaller "
                          "batch_size / block_size")
    return BlockSampler(blocks, r.batch_size, seed=r.seed, rank=rank, world_size=world_size)


def _check_world_size(r: QATRecipe, world_size: int) -> None:
    if r.batch_size % world_size:
        raise RecipeError(f"batch_size {r.batch_size} (the global batch) is not divisible by the world size "
                          f"{world_size}: each rank takes batch_size / world_size blocks per micro-step; use a "
                          f"batch_size that is a multiple of {world_size}")


def _load_base_model(r: QATRecipe):
    """(model, tokenizer, train_blocks or None) for ``r.model``."""
    if r.model == "tiny":
        from .data import train_tokenizer

        texts = _load_texts_or_fail(r, "train")
        tok = train_tokenizer(texts, r.vocab_size)
        model = tiny_llama(len(tok), seed=r.seed, **r.model_config)
        return model, tok
    from .hf import load_model

    if os.path.isfile(os.path.join(os.fspath(r.model), LATEST_NAME)):
        raise RecipeError(f"model {r.model!r} is a `paretoq qat` output folder: continue that run with "
                          f"--output-dir {r.model}, or pack it with `paretoq convert {r.model} <out>`; "
                          "--model takes the full-precision model QAT starts from")
    model, tok = load_model(r.model)  # ModelLoadError (an OSError) names the id/path
    _refuse_quantized_start(model, r.model)
    if tok is None:
        raise RecipeError(f"model {r.model!r} has no tokenizer files; save one next to it")
    if model.get_input_embeddings().num_embeddings < len(tok):
        raise RecipeError(f"model {r.model!r}: its tokenizer has {len(tok)} tokens but the model's embedding "
                          f"only {model.get_input_embeddings().num_embeddings} rows; use the tokenizer saved "
                          "with the model (or resize the embedding with model.resize_token_embeddings)")
    return model, tok


def _refuse_quantized_start(model: nn.Module, name: str) -> None:
    """QAT starts from a full-precision model: refuse a packed folder or a QAT checkpoint, once."""
    from ..packed import ParetoQPackedTensor
    from ..qat import ParetoQQATWeight

    for kind, what, fix in ((ParetoQPackedTensor, "packed (a `paretoq convert` output)",
                             "QAT starts from the full-precision model the packed one was made from"),
                            (ParetoQQATWeight, "a QAT checkpoint (ParetoQ fake-quant weights)",
                             "continue its run with --output-dir <its qat output folder>, or pack it with "
                             "`paretoq convert`")):
        layers = [n for n, m in model.named_modules() if isinstance(m._parameters.get("weight"), kind)]
        if layers:
            raise RecipeError(f"model {name!r} is {what}: {len(layers)} layers (first {layers[0]!r}) already "
                              f"quantized; {fix}")
