"""Shared tiny models for the paretoq_ao test-suite (no downloads, all built from code).

* ``make_decoder``: a decoder-like ``TinyDecoder`` -- nn.Embedding, an nn.ModuleList of blocks with
  three nn.Linear each (48->48 without bias, 48->80 *with* bias, 80->48), a final norm and an
  ``lm_head`` Linear (optionally tied to the embedding).
* ``make_llama``: a tiny ``transformers`` LlamaForCausalLM built from a LlamaConfig.
* ``tokens``: a fixed batch of token ids for ``TinyDecoder``.
* ``single_thread``: opt-in fixture running a test with one intra-op thread.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64
DIM = 48
HIDDEN = 80  # 48 and 80: non powers of two; 16 and 8 divide both, 24 and 32 do not divide 80

# Linears of one TinyBlock: (name, in_features, out_features, has_bias)
BLOCK_LINEARS = (("proj", DIM, DIM, False), ("up", DIM, HIDDEN, True), ("down", HIDDEN, DIM, False))


class TinyBlock(nn.Module):
    def __init__(self, dim: int = DIM, hidden: int = HIDDEN):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden, bias=True)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        x = x + self.proj(self.norm1(x))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyDecoder(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = DIM, hidden: int = HIDDEN, n_layers: int = 2,
                 tie: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([TinyBlock(dim, hidden) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))

    def loss(self, ids, targets=None):
        """Next-token style cross-entropy (targets default to the inputs: memorisation)."""
        logits = self(ids)
        targets = ids if targets is None else targets
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def block_linear_names(self):
        return [f"blocks.{i}.{name}" for i in range(len(self.blocks)) for name, *_ in BLOCK_LINEARS]


def _make_decoder(seed: int = 0, n_layers: int = 2, tie: bool = False, dtype=torch.float32):
    torch.manual_seed(seed)
    model = TinyDecoder(n_layers=n_layers, tie=tie)
    # LayerNorm starts at (1, 0); perturb it so that its parameters matter in comparisons.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
    return model.to(dtype)


LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _make_llama(seed: int = 0, tie: bool = False, n_layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


@pytest.fixture
def make_decoder():
    """Factory: ``make_decoder(seed=0, n_layers=2, tie=False, dtype=torch.float32)``."""
    return _make_decoder


@pytest.fixture
def make_llama():
    """Factory: ``make_llama(seed=0, tie=False, n_layers=2)`` -> tiny LlamaForCausalLM (eval mode)."""
    return _make_llama


@pytest.fixture
def llama_block_linears():
    def names(model):
        return [f"model.layers.{i}.{n}" for i in range(model.config.num_hidden_layers) for n in LLAMA_LINEARS]

    return names


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (4, 12), generator=g)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread (restored afterwards). The models are tiny: one thread is
    faster, and it keeps the suite fast on a shared, busy machine where spinning OpenMP threads make
    small ops orders of magnitude slower. Opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Shapes of the activations of every ``triton_linear`` call made through ``paretoq::linear``
    (the op looks the function up on the package at each call). Imports the kernels package when
    used, so only tests that run the kernels (interpreted or compiled) should ask for it."""
    import paretoq_ao.triton_kernels as tk

    calls = []
    real = tk.triton_linear

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(tk, "triton_linear", spy)
    return calls


@pytest.fixture(scope="session")
def pte_zoo(tmp_path_factory):
    """Every packed format x layout in one eager model, and its ``.pte`` programs exported once per
    (activations, weight order) for the whole session: ``pte_zoo.model``, ``pte_zoo.path(acts, order)``
    (tests/_pte_zoo.py). Tests that use it must not change the model, except its activation mode."""
    pytest.importorskip("executorch")
    from _pte_zoo import PteZoo

    return PteZoo(tmp_path_factory.mktemp("pte_zoo"))
