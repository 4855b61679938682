"""Packed ParetoQ Llama-family models -> GGUF files that llama.cpp (and Ollama, LM Studio, llama-server) runs.

    from paretoq_ao.export.gguf import export_gguf
    report = export_gguf(packed_model, tokenizer, "model.gguf")      # paretoq export --format gguf

The file is written with the ``gguf`` package (llama.cpp's own reader/writer), atomically. Each
packed layer becomes the GGUF type that stores the same dequantized weights (``gguf_blocks``: the
mapping, exact up to the fp16 rounding of the block scales for per-row scales); every written
weight is read back with gguf's dequantizers and compared with the layer's own dequantized
weight, and the report gives that relative error per tensor (``exact``: below ``EXACT_REL_ERROR``).
Default types, smallest exact first:

| ParetoQ bits | per-row scales (or groups of 256k) | smaller groups (nearest; error reported) |
|---|---|---|
| 4 | Q4_0 (exact)  | Q4_0 (exact for groups of 32k) |
| 3 | Q3_K (exact)  | Q3_K (integer sub-scales per 16) |
| 2 | Q2_K (exact)  | Q2_K (integer sub-scales per 16) |
| 1.58 | TQ1_0 (exact) | Q2_K (integer sub-scales per 16) |
| 1 | TQ1_0 (exact) | Q2_K (integer sub-scales per 16) |

``weight_types={bits: "Q4_0", ...}`` overrides them (Q4_0 and Q8_0 hold every format exactly with
groups of 32k). The token embedding and a full-precision head are written as ``embedding_type`` /
``head_type`` (F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1 or Q4_0, through gguf's quantizers: round to
nearest per block, as llama-quantize does for those types); norms and biases stay F32.

Families (``ARCHS``, one row of traits each): Llama and Mistral (llama.cpp's ``llama``), Qwen2 (``qwen2``:
q/k/v biases) and Qwen3 (``qwen3``: q/k RMS norms). For ``llama`` the q/k projections (and biases) are
row-permuted into llama.cpp's interleaved rotary layout, as llama.cpp's own converter does (whole rows:
the codes and scales move with their rows, nothing is re-quantized); the Qwen families use the
half-split rotary layout of Hugging Face, rows unchanged. RoPE scaling that only rescales the rotary
frequencies ("linear", "llama3", as in Llama 3.1/3.2) is written as llama.cpp's ``rope_freqs`` tensor:
the ratio of the plain frequencies to the model's own ``rotary_emb.inv_freq``, so llama.cpp rotates by
exactly the model's angles; other kinds (YaRN, dynamic NTK, LongRoPE: position- or length-dependent)
are refused with the kind named.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from ..formats import get_format
from ..packed import ParetoQPackedTensor
from ..qat import ParetoQQATWeight
from ..serialization import atomic_write
from .gguf_blocks import DEFAULT_TYPES, GGUF_TYPES, lattice, pack_blocks, type_problem

__all__ = ["export_gguf", "ARCHS", "FLOAT_TYPES", "EXACT_REL_ERROR", "GROUP_DEFAULT_TYPES"]

log = logging.getLogger("paretoq_ao")

EXACT_REL_ERROR = 1e-3  # fp16 block scales: below 2^-11 relative per weight
# types of the embedding / a float head: those gguf's own quantizers write (the K types have none)
FLOAT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
GROUP_DEFAULT_TYPES = {4: "Q4_0", 3: "Q3_K", 2: "Q2_K", 1.58: "Q2_K", 1: "Q2_K"}


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face model family is written for llama.cpp."""
    name: str            # llama.cpp's architecture (general.architecture, the metadata key prefix)
    tensors: str         # the gguf.MODEL_ARCH whose tensor-name map applies
    interleave_qk: bool  # permute q/k rows into llama.cpp's interleaved rotary layout
    freq_factors: bool   # llama.cpp reads rope_freqs.weight for this architecture


# Hugging Face model_type -> how it is exported
ARCHS = {
    "llama": Arch("llama", "LLAMA", True, True),
    "mistral": Arch("llama", "LLAMA", True, True),
    "qwen2": Arch("qwen2", "QWEN2", False, False),
    "qwen3": Arch("qwen3", "QWEN3", False, False),
}
_FREQ_ONLY_ROPE = ("linear", "llama3")  # RoPE scalings that only rescale the frequencies
# general.file_type of a file whose block linears are mostly of a type (informational for readers)
_FILE_TYPES = {"Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0", "Q3_K": "MOSTLY_Q3_K_S", "Q2_K": "MOSTLY_Q2_K",
               "TQ2_0": "MOSTLY_TQ2_0", "TQ1_0": "MOSTLY_TQ1_0"}


def export_gguf(model: nn.Module, tokenizer, path, *, embedding_type: str = "F16", head_type: str = "F16",
                weight_types: Optional[Dict] = None, name: Optional[str] = None) -> dict:
    """Write ``model`` (a packed Hugging Face Llama-family model) and ``tokenizer`` to ``path``.

    Returns ``{"path", "bytes", "tensors": {gguf name: {"source", "type", "rel_error", "exact"}},
    "inexact": [gguf names]}``. Every check (model family, unconverted or QAT layers, a type that
    cannot hold a layer) runs before the file is started; ``path`` is replaced atomically."""
    cfg, arch, freqs = _check_model(model)
    if tokenizer is None:
        raise ValueError("export_gguf: a tokenizer is required (llama.cpp reads the vocabulary from the file)")
    for what, t in (("embedding_type", embedding_type), ("head_type", head_type)):
        if t not in FLOAT_TYPES:
            raise ValueError(f"export_gguf: {what} must be one of {', '.join(FLOAT_TYPES)}, got {t!r}")
    chosen = _weight_types(weight_types)
    entries = _plan(model, cfg, arch, chosen, embedding_type, head_type)
    if freqs is not None:
        entries.append({"gguf": "rope_freqs.weight", "source": "model.rotary_emb.inv_freq", "tensor": freqs,
                        "rows": None, "type": "F32"})
    import gguf

    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        vocab = _vocab(Path(tok_dir), cfg.vocab_size)
        special = gguf.SpecialVocab(Path(tok_dir), load_merges=vocab["model"] == "gpt2", n_vocab=cfg.vocab_size)
    report = {}
    writer_tensors = []
    for e in entries:
        raw, qtype, rel = _encode(e)
        writer_tensors.append((e["gguf"], raw, qtype))
        report[e["gguf"]] = {"source": e["source"], "type": e["type"], "rel_error": rel,
                             "exact": rel <= EXACT_REL_ERROR}

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch.name)
        _add_metadata(w, cfg, name or os.path.basename(str(getattr(cfg, "name_or_path", "")) or "paretoq"))
        w.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[_dominant(entries)]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_vocab(w, vocab, special)
        for gname, raw, qtype in writer_tensors:
            w.add_tensor(gname, raw, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, write)
    inexact = [n for n, r in report.items() if not r["exact"]]
    if inexact:
        log.warning("export_gguf: %d tensor(s) are the nearest their GGUF type holds, not exact: %s", len(inexact),
                    ", ".join(f"{n} ({report[n]['type']}, rel. error {report[n]['rel_error']:.2%})" for n in inexact))
    return {"path": os.fspath(path), "bytes": os.path.getsize(path), "tensors": report, "inexact": inexact}


def _check_model(model):
    """(config, Arch, rope frequency factors or None); raises for a family or RoPE kind it cannot write."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in ARCHS:
        raise ValueError(f"export_gguf: exports Llama-family models ({', '.join(sorted(ARCHS))}); the model is "
                         f"{kind or type(model).__name__!r}")
    return cfg, ARCHS[kind], _rope_factors(model, cfg, ARCHS[kind])


def _rope_base(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(getattr(cfg, "rope_theta", None) or rope.get("rope_theta", 10000.0))


def _rope_factors(model, cfg, arch: Arch) -> Optional[torch.Tensor]:
    """llama.cpp's rope_freqs (plain frequency / the model's frequency, per rotary pair), or None for plain RoPE."""
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind == "default":
        return None
    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    inv = getattr(rot, "inv_freq", None)
    if kind not in _FREQ_ONLY_ROPE or not arch.freq_factors or inv is None \
            or float(getattr(rot, "attention_scaling", 1.0)) != 1.0:
        raise ValueError(f"export_gguf: RoPE scaling {kind!r} is not supported for {cfg.model_type!r} (supported: "
                         f"plain RoPE, and {', '.join(_FREQ_ONLY_ROPE)} for Llama/Mistral)")
    dim = 2 * inv.numel()
    plain = 1.0 / (_rope_base(cfg) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return (plain / inv.detach().to(torch.float64).cpu()).to(torch.float32)


def _weight_types(weight_types) -> Dict:
    out = {}
    for bits, t in (weight_types or {}).items():
        fmt = get_format(bits)  # raises a clear error for unknown bits
        if t not in GGUF_TYPES:
            raise ValueError(f"export_gguf: weight_types[{bits}] must be one of {', '.join(GGUF_TYPES)}, got {t!r}")
        out[fmt.bits] = t
    return out


def _rope_rows(n: int, heads: int) -> np.ndarray:
    """Row order of llama.cpp's rotary layout for a q/k projection of ``n`` rows and ``heads`` heads."""
    return np.arange(n).reshape(heads, 2, n // heads // 2).swapaxes(1, 2).reshape(n)


def _plan(model, cfg, arch: Arch, chosen, embedding_type, head_type) -> list:
    """One entry per tensor to write; raises (naming the layer) before anything is encoded."""
    import gguf

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.tensors), cfg.num_hidden_layers)
    emb = model.get_input_embeddings().weight
    entries, bad, packed = [], [], 0
    for hf_name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, ParetoQQATWeight):
            bad.append(f"{hf_name}: QAT weights (latent, not packed); convert the model first (paretoq convert)")
            continue
        if hf_name.endswith((".weight_scale", ".weight_qat_format")):  # the rest of a QAT layer's state
            continue
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            bad.append(f"{hf_name}: no llama.cpp tensor of that name")
            continue
        if gname == "output.weight" and t is emb:
            continue  # tied head: llama.cpp reads token_embd
        entry = {"gguf": gname, "source": hf_name, "tensor": t, "rows": None}
        if arch.interleave_qk and gname.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
            heads = cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads
            entry["rows"] = _rope_rows(t.shape[0], heads)
        if isinstance(t, ParetoQPackedTensor):
            packed += 1
            err = _choose_packed(entry, t, chosen)
            if err:
                bad.append(f"{hf_name} ({t.bits}-bit, group_size {t.group_size}, in_features {t.shape[1]}): {err}")
        elif type(t) not in (torch.Tensor, nn.Parameter) or not t.dtype.is_floating_point:
            bad.append(f"{hf_name}: a {type(t).__name__} of {t.dtype}; export_gguf writes ParetoQ packed and float "
                       "weights")
        else:
            entry["type"] = "F32" if t.dim() == 1 else (embedding_type if t is emb else head_type)
        entries.append(entry)
    if bad:
        more = f"; and {len(bad) - 6} more" if len(bad) > 6 else ""
        raise ValueError("export_gguf: cannot export " + "; ".join(bad[:6]) + more)
    if not packed:
        raise ValueError("export_gguf: the model has no packed ParetoQ layers (an unconverted float model); convert "
                         "it first with paretoq_ao.quantize(model, ParetoQWeightOnlyConfig(bits=...))")
    return entries


def _choose_packed(entry: dict, t: ParetoQPackedTensor, chosen: Dict) -> str:
    bits, gs, k = get_format(t.bits).bits, t.group_size, t.shape[1]
    per_block = gs is None or gs % 256 == 0
    name = chosen.get(bits) or (DEFAULT_TYPES if per_block else GROUP_DEFAULT_TYPES)[bits]
    entry["type"] = name
    return type_problem(GGUF_TYPES[name], bits, k, gs)


def _encode(e: dict):
    """(raw array for the writer, its GGML type or None, relative error of gguf's read-back)."""
    from gguf import GGMLQuantizationType, quants

    t, rows = e["tensor"], e["rows"]
    if isinstance(t, ParetoQPackedTensor):
        codes, scale = t.codes(), t.scale.detach()
        if rows is not None:
            codes, scale = codes[torch.from_numpy(rows)], scale[torch.from_numpy(rows)]
        L, u = lattice(codes, scale, t.bits)
        ref = L.astype(np.float32) * u
        gt = GGUF_TYPES[e["type"]]
        raw, qtype = pack_blocks(gt, L, u, t.bits), gt.qtype
    else:
        ref = t.detach().to(torch.float32).cpu().numpy()
        if rows is not None:
            ref = ref[rows]
        ref = np.ascontiguousarray(ref)
        if e["type"] == "F32":
            return ref, None, 0.0
        if e["type"] == "F16":
            raw, qtype = ref.astype(np.float16), None
            back = raw.astype(np.float32)
            return raw, None, _rel(back, ref)
        qtype = getattr(GGMLQuantizationType, e["type"])
        raw = quants.quantize(ref, qtype)
    back = quants.dequantize(raw, qtype).reshape(ref.shape)
    return raw, qtype, _rel(back, ref)


def _dominant(entries) -> str:
    """The GGUF type holding the most packed weights."""
    count: Dict[str, int] = {}
    for e in entries:
        if isinstance(e["tensor"], ParetoQPackedTensor):
            count[e["type"]] = count.get(e["type"], 0) + e["tensor"].numel()
    return max(count, key=count.get)


def _rel(back: np.ndarray, ref: np.ndarray) -> float:
    norm = float(np.linalg.norm(ref))
    return float(np.linalg.norm(back - ref)) / norm if norm else float(np.abs(back).max(initial=0.0))


def _add_metadata(w, cfg, name: str) -> None:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    w.add_rope_freq_base(_rope_base(cfg))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)


def _vocab(folder: Path, n_vocab: int) -> dict:
    """Tokens, scores and types as llama.cpp's converter reads them (gguf's vocab classes: a
    SentencePiece model, a Llama byte-fallback BPE, or a GPT-2 byte-level BPE), padded to ``n_vocab``."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab

    for cls in (SentencePieceVocab, LlamaHfVocab, BpeVocab):
        try:
            v = cls(folder)
            break
        except FileNotFoundError:  # the classes' way of saying "not this kind of tokenizer"
            continue
    else:
        raise ValueError("export_gguf: the tokenizer is none of SentencePiece, Llama BPE or GPT-2 byte-level BPE")
    tokens, scores, types = [], [], []
    for text, score, kind in v.all_tokens():
        tokens.append(text if isinstance(text, bytes) else text.encode("utf-8"))
        scores.append(score)
        types.append(kind)
    if len(tokens) > n_vocab:
        raise ValueError(f"export_gguf: the tokenizer has {len(tokens)} tokens, more than the model's vocab_size "
                         f"{n_vocab}")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return {"model": v.tokenizer_model, "tokens": tokens, "scores": scores, "types": types}


def _add_vocab(w, vocab: dict, special) -> None:
    w.add_tokenizer_model(vocab["model"])
    if vocab["model"] == "gpt2":
        w.add_tokenizer_pre("default")
    w.add_token_list(vocab["tokens"])
    w.add_token_scores(vocab["scores"])
    w.add_token_types(vocab["types"])
    special.add_to_gguf(w, quiet=True)
