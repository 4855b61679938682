"""The gpt-fast-style Llama decoder of ``bench_decode.py`` (RMSNorm, static KV cache, RoPE, GQA, SwiGLU).

Imported lazily by ``bench_decode.build_model`` (this module imports torch; the benchmark's argument
parsing does not). The shape comes from ``bench_decode.ModelArgs``; see bench_decode's docstring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from bench_decode import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class KVCache(nn.Module):
    def __init__(self, batch, max_seq, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        # input_pos [S]; k, v [B, H_kv, S, D]
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


def apply_rotary(x, freqs):
    # x [B, S, H, D]; freqs [S, D // 2, 2] (cos, sin)
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1],
                       xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], -1)
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.dim = a.n_heads, a.n_kv_heads, a.head_dim, a.dim
        self.wqkv = nn.Linear(a.dim, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)
        self.kv_cache = None

    def forward(self, x, freqs, mask, input_pos):
        b, s, _ = x.shape
        kv = self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)
        q = apply_rotary(q.view(b, s, self.n_heads, self.head_dim), freqs)
        k = apply_rotary(k.view(b, s, self.n_kv_heads, self.head_dim), freqs)
        v = v.view(b, s, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = self.kv_cache.update(input_pos, k, v)
        rep = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        return self.wo(y.transpose(1, 2).contiguous().view(b, s, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(a.dim, a.intermediate_size, bias=False)
        self.w3 = nn.Linear(a.dim, a.intermediate_size, bias=False)
        self.w2 = nn.Linear(a.intermediate_size, a.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attention = Attention(a)
        self.feed_forward = FeedForward(a)
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)

    def forward(self, x, freqs, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), freqs, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList([Block(a) for _ in range(a.n_layers)])
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
        self.max_seq = 0

    def setup_caches(self, batch: int, max_seq: int, static_address: bool):
        a = self.args
        dtype, device = self.tok_embeddings.weight.dtype, self.tok_embeddings.weight.device
        self.max_seq = max_seq
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch, max_seq, a.n_kv_heads, a.head_dim, dtype, device)
            if static_address:  # fixed addresses for CUDA-graph replay (as HF's StaticCache does)
                torch._dynamo.mark_static_address(layer.attention.kv_cache.k_cache)
                torch._dynamo.mark_static_address(layer.attention.kv_cache.v_cache)
        inv = 1.0 / (a.rope_base ** (torch.arange(0, a.head_dim, 2, device=device).float() / a.head_dim))
        ang = torch.outer(torch.arange(max_seq, device=device).float(), inv)
        self.register_buffer("freqs", torch.stack([ang.cos(), ang.sin()], -1).to(dtype), persistent=False)
        self.register_buffer("causal_mask", torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool,
                                                                  device=device)), persistent=False)

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in (layer.attention.kv_cache.k_cache, layer.attention.kv_cache.v_cache))

    def forward(self, idx, input_pos):
        mask = self.causal_mask[None, None, input_pos]
        freqs = self.freqs[input_pos]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, freqs, mask, input_pos)
        return self.output(self.norm(x))
