"""Minimal decode wrapper for a transformers Llama model with a static KV cache held as buffers.

transformers' own ``TorchExportableModuleWithStaticCache`` fails in ``run_decompositions`` with this
torch/executorch ("expected compiled_fn to be GraphModule"); this wrapper exports and lowers.

Two attention implementations (``LlamaKVStep(..., attention=...)``), the same numbers:

* ``"custom"`` (the default): ExecuTorch's LLM kernels ``llama::update_cache`` (writes the new K/V
  rows into the cache in place) and ``llama::custom_sdpa`` (causal attention over the first
  ``pos + T`` cache rows only), from ``executorch.extension.llm.custom_ops`` -- the kernels
  ExecuTorch's own Llama runner links. A step's cost grows with the position, not with ``max_len``,
  and the cache is never copied. The program needs that kernel library at run time
  (``load_executorch`` loads it; a C++ app links ``custom_ops``, as ExecuTorch's llama runner does).
  Cache layout [1, max_len, kv_heads, head_dim]; positions of one call must be consecutive.
* ``"reference"``: plain PyTorch (``index_copy_`` into the cache, a masked matmul over all
  ``max_len`` rows): no extra kernel library, but every step reads and (in ExecuTorch, through the
  functional ``index_put``) copies the whole cache, and masks it. Cache layout
  [1, kv_heads, max_len, head_dim]; any positions.
"""
from __future__ import annotations

__all__ = ["LlamaKVStep", "export_llama", "ATTENTION", "custom_ops_available"]

import warnings

import torch
import torch.nn as nn

from ._llm_ops import custom_ops_available

ATTENTION = ("custom", "reference")


class LlamaKVStep(nn.Module):
    """Minimal decode wrapper around a transformers LlamaForCausalLM with a static KV cache held
    as buffers: forward(ids [1, T], pos [T]) -> logits [1, T, vocab]; writes K/V at `pos`.
    ``attention``: "custom" (ExecuTorch's llama::custom_sdpa, the default) or "reference"
    (module docstring)."""
    def __init__(self, model, max_len, attention: str = "custom"):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"LlamaKVStep: attention must be one of {ATTENTION}, got {attention!r}")
        if attention == "custom" and not custom_ops_available():
            raise RuntimeError("LlamaKVStep: attention='custom' needs ExecuTorch's LLM custom ops "
                               "(executorch.extension.llm.custom_ops), which do not load here; "
                               "use attention='reference'")
        self.model = model
        c = model.config
        self.nh, self.nkv = c.num_attention_heads, c.num_key_value_heads
        self.hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.attention = attention
        shape = (1, max_len, self.nkv, self.hd) if attention == "custom" else (1, self.nkv, max_len, self.hd)
        for i in range(c.num_hidden_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape))
            self.register_buffer(f"v{i}", torch.zeros(shape))
        self.max_len = max_len

    def _grouped_attention(self, q, kc, vc, mask, T):
        """Grouped-query attention without copying the cache: the rep = nh / nkv query heads of
        each KV head attend to it as rep * T query rows (head h = kv * rep + r). Returns the
        attention output as [1, T, nh * hd]."""
        rep = self.nh // self.nkv
        qg = q.reshape(1, self.nkv, rep * T, self.hd)
        scores = torch.matmul(qg, kc.transpose(-2, -1)) * (self.hd ** -0.5)
        scores = scores + mask.repeat(rep, 1)
        o = torch.matmul(torch.softmax(scores, dim=-1), vc)  # [1, nkv, rep * T, hd]
        return o.unflatten(2, (rep, T)).permute(0, 3, 1, 2, 4).reshape(1, T, self.nh * self.hd)

    def _qkv(self, a, x, cos, sin, T, heads_first: bool):
        """q, k, v of one layer with rotary applied: [1, heads, T, hd] (heads_first) or [1, T, heads, hd]."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        q, k, v = (p(x).view(1, T, n, self.hd) for p, n in ((a.q_proj, self.nh), (a.k_proj, self.nkv),
                                                              (a.v_proj, self.nkv)))
        if heads_first:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1 if heads_first else 2)
        return q, k, v

    def _reference_layer(self, a, x, cos, sin, i, pos, mask, T):
        q, k, v = self._qkv(a, x, cos, sin, T, heads_first=True)
        kc, vc = getattr(self, f"k{i}"), getattr(self, f"v{i}")
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        return self._grouped_attention(q, kc, vc, mask, T)

    def _custom_layer(self, a, x, cos, sin, i, start, T):
        q, k, v = self._qkv(a, x, cos, sin, T, heads_first=False)
        kc, vc = getattr(self, f"k{i}"), getattr(self, f"v{i}")
        if torch.compiler.is_exporting():  # the program: ExecuTorch's kernels
            torch.ops.llama.update_cache(k, kc, start)
            torch.ops.llama.update_cache(v, vc, start)
            o = torch.ops.llama.custom_sdpa(q, kc, vc, start, None, 0.0, True)  # rows < start + T, causal
        else:  # eager: plain PyTorch on the same cache (the oracle the programs are tested against)
            kc[:, start:start + T] = k
            vc[:, start:start + T] = v
            n = start + T
            allowed = torch.arange(n)[None, :] <= torch.arange(start, n)[:, None]
            o = nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), kc[:, :n].transpose(1, 2), vc[:, :n].transpose(1, 2), attn_mask=allowed,
                enable_gqa=True).transpose(1, 2)
        return o.reshape(1, T, self.nh * self.hd)

    def forward(self, ids, pos):
        m = self.model.model
        h = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(h, pos[None])
        T = ids.shape[1]
        if self.attention == "custom":
            start = pos[0].item()
            torch._check(start >= 0)
            torch._check(start + T <= self.max_len)
        else:  # additive mask, built once for all layers
            allowed = torch.arange(self.max_len)[None, :] <= pos[:, None]
            mask = torch.where(allowed, 0.0, float("-inf"))
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            if self.attention == "custom":
                o = self._custom_layer(a, x, cos, sin, i, start, T)
            else:
                o = self._reference_layer(a, x, cos, sin, i, pos, mask, T)
            h = h + a.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(m.norm(h))


def export_llama(model, path, *, max_len: int = 256, embedding_bits=None, activations="int8",
                 attention: str = "custom", weight_order: str = "blocked16") -> dict:
    """A packed Hugging Face Llama-family model -> a ``.pte`` that runs one KV-cache decode step:
    ``forward(ids [1, 1], pos [1]) -> logits [1, 1, vocab]``, called token by token (what
    ``paretoq export`` writes). bf16/fp16 scales and float weights are converted to float32 first
    (the ExecuTorch kernels take float32; the codes are unchanged). ``attention``: "custom"
    (ExecuTorch's llama::custom_sdpa / update_cache: a step costs what its position needs, whatever
    ``max_len``) or "reference" (plain ops over the whole cache; module docstring). ``weight_order``:
    as ``export_executorch`` ("blocked16" default, or "rows"). Returns
    ``{"path": ..., "converted": {name: old dtype}}``. A model that is not a Llama decoder, or a bad
    ``max_len`` / ``attention``, is refused (ValueError) before anything is exported."""
    from . import export_executorch, to_float32

    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if kind != "llama":
        raise ValueError(f"export_llama: supports Llama-family decoders (a KV-cache decode step); "
                         f"the model is {kind!r}")
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"export_llama: max_len must be a whole number >= 1, got {max_len!r}")
    if attention not in ATTENTION:
        raise ValueError(f"export_llama: attention must be one of {ATTENTION}, got {attention!r}")
    if weight_order not in ("blocked16", "rows"):
        raise ValueError(f"export_llama: weight_order must be 'blocked16' or 'rows', got {weight_order!r}")
    converted = to_float32(model)
    step = LlamaKVStep(model, max_len, attention=attention)
    with warnings.catch_warnings():
        # ExecuTorch's own fake kernels of llama::custom_sdpa call a deprecated torch check once per
        # layer per trace (hundreds of identical FutureWarnings); nothing the caller can act on
        warnings.filterwarnings("ignore", message="_check_is_size will be removed", category=FutureWarning)
        out = export_executorch(step, (torch.tensor([[0]]), torch.tensor([0])), path,
                                embedding_bits=embedding_bits, activations=activations,
                                weight_order=weight_order)
    return {"path": out, "converted": converted}
