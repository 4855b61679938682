"""The decoder the whole-model CPU benchmarks share (bench_executorch_decoder, bench_cpu_decoder,
bench_llamacpp): one Llama shape, its flags, its config and which of its layers are "block linears",
so that the three measure the same model and their tables can be read side by side.

The shape is a 2048-wide, 16-layer Llama with grouped-query attention (32 heads, 4 KV heads), an
MLP of 5632 and a 32000-token vocabulary, untied head, random weights (``LlamaForCausalLM(cfg)``).
"""

from __future__ import annotations

import argparse
from typing import Dict

from torch import nn

FULL: Dict[str, int] = dict(hidden=2048, intermediate=5632, layers=16, heads=32, kv_heads=4, vocab=32000)


def add_shape_args(ap: argparse.ArgumentParser, small: Dict[str, int], small_flag: str) -> None:
    """``--hidden``, ``--intermediate``, ``--layers``, ``--heads``, ``--kv-heads``, ``--vocab``."""
    for k in FULL:
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None,
                        help=f"default {FULL[k]} ({small[k]} with {small_flag})")


def fill_shape(a: argparse.Namespace, small: Dict[str, int], use_small: bool) -> None:
    """Give every shape flag left unset its default (``small`` under the benchmark's small flag)."""
    base = small if use_small else FULL
    for k in FULL:
        if getattr(a, k) is None:
            setattr(a, k, base[k])


def llama_config(a: argparse.Namespace, positions: int):
    """The LlamaConfig of the shape flags in ``a`` with room for ``positions`` tokens (at least 128)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                       max_position_embeddings=max(128, positions), tie_word_embeddings=False)


def is_block_linear(mod: nn.Module, fqn: str) -> bool:
    """Every nn.Linear inside the decoder blocks (q/k/v/o, gate/up/down); not the head."""
    return isinstance(mod, nn.Linear) and ".layers." in f".{fqn}."
