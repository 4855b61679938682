"""Minimal decode wrapper for a transformers Llama model with a static KV cache held as buffers.

transformers' own ``TorchExportableModuleWithStaticCache`` fails in ``run_decompositions`` with this
torch/executorch ("expected compiled_fn to be GraphModule"); this wrapper exports and lowers.
"""
from __future__ import annotations

__all__ = ["LlamaKVStep", "export_llama"]

import torch
import torch.nn as nn


class LlamaKVStep(nn.Module):
    """Minimal decode wrapper around a transformers LlamaForCausalLM with a static KV cache held
    as buffers: forward(ids [1, T], pos [T]) -> logits [1, T, vocab]; writes K/V at `pos`."""
    def __init__(self, model, max_len):
        super().__init__()
        self.model = model
        c = model.config
        self.nh, self.nkv = c.num_attention_heads, c.num_key_value_heads
        self.hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        for i in range(c.num_hidden_layers):
            self.register_buffer(f"k{i}", torch.zeros(1, self.nkv, max_len, self.hd))
            self.register_buffer(f"v{i}", torch.zeros(1, self.nkv, max_len, self.hd))
        self.max_len = max_len

    def _grouped_attention(self, q, kc, vc, mask, T):
        """Grouped-query attention without copying the cache: the rep = nh / nkv query heads of
        each KV head attend to it as rep * T query rows (head h = kv * rep + r). Returns the
        attention output as [1, T, nh * hd]."""
        rep = self.nh // self.nkv
        qg = q.reshape(1, self.nkv, rep * T, self.hd)
        scores = torch.matmul(qg, kc.transpose(-2, -1)) * (self.hd ** -0.5)
        scores = scores.masked_fill(~mask.repeat(rep, 1), float("-inf"))
        o = torch.matmul(torch.softmax(scores, dim=-1), vc)  # [1, nkv, rep * T, hd]
        return o.unflatten(2, (rep, T)).permute(0, 3, 1, 2, 4).reshape(1, T, self.nh * self.hd)

    def forward(self, ids, pos):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        m = self.model.model
        h = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(h, pos[None])
        T = ids.shape[1]
        mask = torch.arange(self.max_len)[None, :] <= pos[:, None]
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(1, T, self.nh, self.hd).transpose(1, 2)
            k = a.k_proj(x).view(1, T, self.nkv, self.hd).transpose(1, 2)
            v = a.v_proj(x).view(1, T, self.nkv, self.hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            kc, vc = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            h = h + a.o_proj(self._grouped_attention(q, kc, vc, mask, T))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(m.norm(h))


def export_llama(model, path, *, max_len: int = 256, embedding_bits=None, activations="int8") -> dict:
    """A packed Hugging Face Llama-family model -> a ``.pte`` that runs one KV-cache decode step:
    ``forward(ids [1, 1], pos [1]) -> logits [1, 1, vocab]``, called token by token (what
    ``paretoq export`` writes). bf16/fp16 scales and float weights are converted to float32 first
    (the ExecuTorch kernels take float32; the codes are unchanged). Returns ``{"path": ...,
    "converted": {name: old dtype}}``. A model that is not a Llama decoder is refused (ValueError)
    before anything is exported."""
    from . import export_executorch, to_float32

    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if kind != "llama":
        raise ValueError(f"export_llama: supports Llama-family decoders (a KV-cache decode step); "
                         f"the model is {kind!r}")
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"export_llama: max_len must be a whole number >= 1, got {max_len!r}")
    converted = to_float32(model)
    step = LlamaKVStep(model, max_len)
    out = export_executorch(step, (torch.tensor([[0]]), torch.tensor([0])), path,
                            embedding_bits=embedding_bits, activations=activations)
    return {"path": out, "converted": converted}
