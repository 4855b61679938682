"""Quantized embeddings in ExecuTorch programs (ExecuTorch's own quantized_decomposed kernels)."""

import copy

import pytest
import torch
import torch.nn as nn
from torchao import quantize_

import paretoq_ao.export as pe
from paretoq_ao import ParetoQWeightOnlyConfig
from paretoq_ao.export.embedding import QuantizedEmbedding, quantize_embeddings
from paretoq_ao.quant import dequantize_codes, quantize_codes, search_scale


class Tiny(nn.Module):
    def __init__(self, vocab=53, dim=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, 40)
        self.head = nn.Linear(40, vocab)

    def forward(self, ids):
        return self.head(torch.relu(self.proj(self.embed(ids))))


@pytest.fixture(scope="module", autouse=True)
def kernels():
    pe.load_kernels()


@pytest.mark.parametrize("group_size", [32, 16, 64])
def test_4bit_table_is_paretoq_4bit_rtn_in_executorch_layout(group_size):
    torch.manual_seed(0)
    w = torch.randn(37, 64)
    q = QuantizedEmbedding(w, 4, group_size)
    scale = search_scale(w, 4, group_size)
    oracle = dequantize_codes(quantize_codes(w, scale, 4), scale, 4, torch.float32)
    torch.testing.assert_close(q.dequantized(), oracle, rtol=0, atol=0)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (37, 32)
    # ExecuTorch's own reference implementation of its op reads the same table
    ids = torch.tensor([[0, 5, 36], [7, 7, 1]])
    ref = torch.ops.quantized_decomposed.embedding_4bit.dtype(q.weight, q.scales, None, -8, 7, ids,
                                                              dtype=torch.float32)
    torch.testing.assert_close(ref, oracle[ids], rtol=0, atol=0)
    torch.testing.assert_close(q(ids), oracle[ids], rtol=0, atol=0)


def test_8bit_table():
    torch.manual_seed(1)
    w = torch.randn(11, 48) * torch.linspace(0.01, 3, 48)
    q = QuantizedEmbedding(w, 8, 16)
    assert q.weight.dtype == torch.int8
    err = (q.dequantized() - w).abs()
    bound = w.reshape(11, 3, 16).abs().amax(-1).repeat_interleave(16, 1) / 127 / 2
    assert (err <= bound + 1e-7).all()
    ids = torch.tensor([3, 0, 10])
    torch.testing.assert_close(q(ids), q.dequantized()[ids], rtol=0, atol=0)


def test_bad_input_names_layer_and_shape():
    m = Tiny(dim=60)
    with pytest.raises(ValueError, match=r"embed: embedding dim 60 \(weight \(53, 60\)\) is not a multiple of group_size=32"):
        quantize_embeddings(m, 4, 32)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_embeddings(Tiny(), 2, 32)
    assert type(m.embed) is nn.Embedding  # nothing changed


@pytest.mark.parametrize("bits,emb_bits", [(2, 4), (1.58, 8), (4, 4)])
def test_pte_with_quantized_embedding_matches_eager(bits, emb_bits, tmp_path):
    torch.manual_seed(2)
    m = Tiny().eval()
    quantize_(m, ParetoQWeightOnlyConfig(bits=bits), filter_fn=lambda mod, fqn: fqn == "proj")
    ids = torch.tensor([[1, 2, 52, 7]])
    path = pe.export_executorch(m, (ids,), tmp_path / "m.pte", embedding_bits=emb_bits, activations="float")
    assert type(m.embed) is nn.Embedding  # the model is unchanged by the export
    eager = copy.deepcopy(m)
    quantize_embeddings(eager, emb_bits, 32)
    f = pe.load_executorch(path)
    with torch.no_grad():
        torch.testing.assert_close(f(ids), eager(ids), rtol=1e-5, atol=1e-5)
    plain = pe.export_executorch(m, (ids,), tmp_path / "plain.pte")
    # 53 x 64 fp32 table (13.6 kB) -> 4 or 8 bits plus one fp32 scale per 32 values
    saved = (tmp_path / "plain.pte").stat().st_size - (tmp_path / "m.pte").stat().st_size
    expect = 53 * 64 * 4 - 53 * 64 * emb_bits // 8 - 53 * 2 * 4
    assert abs(saved - expect) < 512, (saved, expect)
    del plain


def test_llama_decode_with_4bit_embedding(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from paretoq_ao.export.llama import LlamaKVStep

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    step = LlamaKVStep(model, 16)
    path = pe.export_executorch(step, (torch.tensor([[0]]), torch.tensor([0])), tmp_path / "llama.pte",
                                embedding_bits=4, activations="float")
    eager = LlamaKVStep(copy.deepcopy(model), 16)
    quantize_embeddings(eager, 4, 32)
    f = pe.load_executorch(path)
    for i, tok in enumerate([3, 17, 42, 5]):
        with torch.no_grad():
            ref = eager(torch.tensor([[tok]]), torch.tensor([i]))
        torch.testing.assert_close(f(torch.tensor([[tok]]), torch.tensor([i])), ref, rtol=1e-5, atol=1e-5)
