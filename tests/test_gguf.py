"""GGUF export: every ParetoQ format -> its GGUF type, checked against two independent oracles
(our own ``dequantize_codes`` and the ``gguf`` package's dequantizers); whole Llama models read
back by gguf's reader; bad input; the CLI. llama.cpp itself runs the files in test_gguf_llamacpp.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from paretoq_ao import ParetoQQATConfig, ParetoQWeightOnlyConfig, dequantize_codes, get_format, quantize  # noqa: E402
from paretoq_ao.export.gguf import EXACT_REL_ERROR, export_gguf  # noqa: E402
from paretoq_ao.export.gguf_blocks import GGUF_TYPES, lattice, pack_blocks, type_problem  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

BITS = (1, 1.58, 2, 3, 4)


def _random_codes(n, k, bits, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = get_format(bits)
    codes = torch.randint(0, fmt.n_codes, (n, k), generator=g, dtype=torch.uint8)  # every code appears
    scale = torch.rand(n, groups, generator=g) * 0.5 + 0.01
    return codes, scale


def _back(t, raw, n, k):
    return gguf.quants.dequantize(raw, t.qtype).reshape(n, k)


HOLDS = [(b, n) for b in BITS for n, t in GGUF_TYPES.items() if not type_problem(t, b, 256, None)]


def test_which_types_hold_which_formats():
    assert {n for b, n in HOLDS if b == 4} == {"Q8_0", "Q4_0"}
    assert {n for b, n in HOLDS if b == 3} == {"Q8_0", "Q4_0", "Q3_K"}
    assert {n for b, n in HOLDS if b == 2} == {"Q8_0", "Q4_0", "Q3_K", "Q2_K"}
    assert {n for b, n in HOLDS if b == 1.58} == set(GGUF_TYPES) == {n for b, n in HOLDS if b == 1}


@pytest.mark.parametrize("bits,name", HOLDS)
@pytest.mark.parametrize("n,k,gs", [(7, 768, None), (5, 512, 256), (3, 256, 256)])
def test_exact_types_store_the_same_weights(bits, name, n, k, gs):
    t = GGUF_TYPES[name]
    codes, scale = _random_codes(n, k, bits, 1 if gs is None else k // gs)
    ref = dequantize_codes(codes, scale, bits).numpy()  # the oracle our kernels are tested against
    L, u = lattice(codes, scale, bits)
    back = _back(t, pack_blocks(t, L, u, bits), n, k)
    # exact up to the fp16 rounding of the block scale: 2^-11 relative, per weight
    assert np.all(np.abs(back - ref) <= 2.0 ** -11 * np.abs(ref) + 1e-12), (bits, name)
    assert np.array_equal(back == 0, ref == 0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_q4_0_and_q8_0_hold_every_format_with_groups_exactly(bits, gs):
    n, k = 4, 256 + 2 * gs if gs != 128 else 384
    codes, scale = _random_codes(n, k, bits, k // gs, seed=3)
    ref = dequantize_codes(codes, scale, bits).numpy()
    L, u = lattice(codes, scale, bits)
    for name in ("Q4_0", "Q8_0"):
        t = GGUF_TYPES[name]
        back = _back(t, pack_blocks(t, L, u, bits), n, k)
        assert np.all(np.abs(back - ref) <= 2.0 ** -11 * np.abs(ref) + 1e-12), (name, bits, gs)


@pytest.mark.parametrize("bits,name", [(3, "Q3_K"), (2, "Q2_K"), (1.58, "Q2_K"), (1, "Q2_K"), (1.58, "TQ1_0")])
def test_small_groups_in_k_types_are_the_nearest_not_exact(bits, name):
    # 64-weight groups in a type with one d per 256: integer sub-scales approximate each group
    n, k, gs = 6, 512, 64
    codes, scale = _random_codes(n, k, bits, k // gs, seed=5)
    ref = dequantize_codes(codes, scale, bits).numpy()
    L, u = lattice(codes, scale, bits)
    t = GGUF_TYPES[name]
    back = _back(t, pack_blocks(t, L, u, bits), n, k)
    rel = np.linalg.norm(back - ref) / np.linalg.norm(ref)
    assert rel > EXACT_REL_ERROR  # a different grid, so it must show as not exact
    # the nearest: a few percent for the K types' sub-scales; one least-squares d per 256 for TQ (these
    # scales spread 50x from group to group, far more than trained ones)
    assert rel < (0.6 if name.startswith("TQ") else 0.06)
    assert np.array_equal(np.sign(back), np.sign(ref))  # the codes themselves are kept


def test_type_problems_name_the_reason():
    assert "cannot hold 4-bit LSQ" in type_problem(GGUF_TYPES["Q3_K"], 4, 256, None)
    assert "cannot hold 3-bit LSQ" in type_problem(GGUF_TYPES["Q2_K"], 3, 256, None)
    assert "cannot hold 2-bit SEQ" in type_problem(GGUF_TYPES["TQ1_0"], 2, 256, None)
    assert "divisible by 256, got 288" in type_problem(GGUF_TYPES["Q2_K"], 2, 288, None)
    assert "group_size divisible by 32, got 16" in type_problem(GGUF_TYPES["Q4_0"], 4, 256, 16)
    assert type_problem(GGUF_TYPES["Q4_0"], 4, 96, 32) == ""


# --------------------------------------------------------------------------- whole models


@pytest.fixture(scope="module")
def tokenizer():
    from paretoq_ao.workflow.data import load_texts, train_tokenizer

    return train_tokenizer(load_texts("stdlib", "train", max_chars=100_000), 300)


def gguf_llama(seed=0, tie=False, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def _read(path):
    r = gguf.GGUFReader(path)
    tensors = {t.name: t for t in r.tensors}
    fields = {k: f for k, f in r.fields.items()}
    return tensors, fields


def _field(fields, key):
    f = fields[key]
    return f.parts[f.data[0]].tolist()[0] if len(f.data) == 1 else [f.parts[i].tolist() for i in f.data]


def _dequant(t):
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))


@pytest.mark.parametrize("bits", BITS)
def test_exported_llama_reads_back_as_the_packed_weights(tmp_path, tokenizer, bits):
    model = gguf_llama()
    quantize(model, ParetoQWeightOnlyConfig(bits=bits))
    rep = export_gguf(model, tokenizer, tmp_path / "m.gguf", embedding_type="F32", head_type="F32")
    assert rep["inexact"] == [] and all(r["exact"] for r in rep["tensors"].values())
    tensors, fields = _read(tmp_path / "m.gguf")
    assert bytes(fields["general.architecture"].parts[fields["general.architecture"].data[0]]).decode() == "llama"
    assert _field(fields, "llama.block_count") == 2 and _field(fields, "llama.attention.head_count_kv") == 2
    assert len(fields["tokenizer.ggml.tokens"].data) == 320
    want = {4: "Q4_0", 3: "Q3_K", 2: "Q2_K", 1.58: "TQ1_0", 1: "TQ1_0"}[bits]
    assert tensors["blk.1.ffn_down.weight"].tensor_type.name == want
    assert tensors["output.weight"].tensor_type.name == "F32"
    layers = dict(model.named_modules())
    for gname, src, heads in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj", 4),
                              ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj", 2),
                              ("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj", None)):
        w = layers[src].weight.dequantize().float().numpy()
        got = _dequant(tensors[gname])
        if heads is not None:  # undo llama.cpp's rotary row order
            n = w.shape[0]
            order = np.arange(n).reshape(heads, 2, n // heads // 2).swapaxes(1, 2).reshape(n)
            restored = np.empty_like(got)
            restored[order] = got
            got = restored
        assert np.all(np.abs(got - w) <= 2.0 ** -11 * np.abs(w) + 1e-12), gname
    assert np.array_equal(_dequant(tensors["token_embd.weight"]), model.model.embed_tokens.weight.detach().numpy())


def test_group_scales_report_the_nearest_per_layer(tmp_path, tokenizer, caplog):
    model = gguf_llama()
    quantize(model, ParetoQWeightOnlyConfig(bits=2, group_size=64))
    rep = export_gguf(model, tokenizer, tmp_path / "g.gguf")
    assert len(rep["inexact"]) == 14  # 7 block linears x 2 layers, each Q2_K with sub-scales
    assert all(0.001 < rep["tensors"][n]["rel_error"] < 0.06 for n in rep["inexact"])
    assert "nearest their GGUF type holds" in caplog.text
    exact = export_gguf(model, tokenizer, tmp_path / "q4.gguf", weight_types={2: "Q4_0"})
    assert exact["inexact"] == []
    assert exact["bytes"] > rep["bytes"]


def test_tied_head_is_not_written_twice(tmp_path, tokenizer):
    model = gguf_llama(tie=True)
    quantize(model, ParetoQWeightOnlyConfig(bits=1.58))
    tensors, _ = _read(export_gguf(model, tokenizer, tmp_path / "t.gguf")["path"])
    assert "output.weight" not in tensors and "token_embd.weight" in tensors


def test_ternary_file_is_smaller_than_two_bit(tmp_path, tokenizer):
    sizes = {}
    for bits in (2, 1.58):
        model = gguf_llama(layers=3)
        quantize(model, ParetoQWeightOnlyConfig(bits=bits))
        sizes[bits] = export_gguf(model, tokenizer, tmp_path / f"{bits}.gguf", embedding_type="Q8_0",
                                  head_type="Q8_0")["bytes"]
    assert sizes[1.58] < sizes[2]


# --------------------------------------------------------------------------- bad input


def test_bad_input_names_the_layer_and_type(tmp_path, tokenizer):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    fp = gguf_llama()
    with pytest.raises(ValueError, match="no packed ParetoQ layers .*unconverted"):
        export_gguf(fp, tokenizer, out)
    qat = gguf_llama()
    quantize(qat, ParetoQQATConfig(bits=2))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight: QAT weights"):
        export_gguf(qat, tokenizer, out)
    with pytest.raises(ValueError, match="exports Llama-family models .*'Linear'"):
        export_gguf(torch.nn.Linear(4, 4), tokenizer, out)
    packed = gguf_llama()
    quantize(packed, ParetoQWeightOnlyConfig(bits=4))
    with pytest.raises(ValueError, match=r"q_proj\.weight \(4-bit, group_size None, in_features 256\): Q3_K "
                                         r"cannot hold 4-bit LSQ"):
        export_gguf(packed, tokenizer, out, weight_types={4: "Q3_K"})
    with pytest.raises(ValueError, match=r"weight_types\[2\] must be one of"):
        export_gguf(packed, tokenizer, out, weight_types={2: "Q9_9"})
    with pytest.raises(ValueError, match="embedding_type must be one of F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, "
                                         "Q4_0, got 'Q2_K'"):
        export_gguf(packed, tokenizer, out, embedding_type="Q2_K")
    with pytest.raises(ValueError, match="a tokenizer is required"):
        export_gguf(packed, None, out)
    assert out.read_bytes() == b"keep me"  # nothing a user saved is destroyed by a refused call


def test_in_features_not_a_multiple_of_the_block(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).eval()
    quantize(model, ParetoQWeightOnlyConfig(bits=2))
    with pytest.raises(ValueError, match=r"q_proj\.weight .*Q2_K needs in_features divisible by 256, got 96;.*"
                                         r"; and 1 more$"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf")
    rep = export_gguf(model, tokenizer, tmp_path / "x.gguf", weight_types={2: "Q4_0"})  # 32-weight blocks
    assert rep["inexact"] == []


# --------------------------------------------------------------------------- command line


def test_cli_exports_a_packed_folder(tmp_path, tokenizer, capsys):
    from paretoq_ao.workflow.cli import main
    from paretoq_ao.workflow.hf import save_quantized

    model = gguf_llama()
    quantize(model, ParetoQWeightOnlyConfig(bits=1.58))
    save_quantized(model, tokenizer, tmp_path / "packed")
    assert main(["export", str(tmp_path / "packed"), str(tmp_path / "m.gguf")]) in (0, None)
    assert "all exact" in capsys.readouterr().out
    tensors, _ = _read(tmp_path / "m.gguf")
    assert tensors["blk.0.attn_v.weight"].tensor_type.name == "TQ1_0"
    assert main(["export", str(tmp_path / "packed"), str(tmp_path / "m2.gguf"), "--weight-type", "1.58=TQ2_0"]) in (0, None)
    assert _read(tmp_path / "m2.gguf")[0]["blk.0.attn_v.weight"].tensor_type.name == "TQ2_0"
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "packed"), str(tmp_path / "m3.gguf"), "--max-len", "64"])
    assert e.value.code == 1 and "--max-len do(es) not apply to --format gguf" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m3.gguf")


@pytest.mark.parametrize("kind", ["BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"])
def test_embedding_and_head_types(tmp_path, tokenizer, kind):
    model = gguf_llama()
    quantize(model, ParetoQWeightOnlyConfig(bits=2))
    rep = export_gguf(model, tokenizer, tmp_path / "e.gguf", embedding_type=kind, head_type=kind)
    tensors, _ = _read(tmp_path / "e.gguf")
    assert tensors["token_embd.weight"].tensor_type.name == kind == tensors["output.weight"].tensor_type.name
    emb = model.model.embed_tokens.weight.detach().numpy()
    back = _dequant(tensors["token_embd.weight"])
    rel = np.linalg.norm(back - emb) / np.linalg.norm(emb)
    assert rel == pytest.approx(rep["tensors"]["token_embd.weight"]["rel_error"], rel=1e-5)
    assert rel < {"BF16": 0.005, "Q8_0": 0.01, "Q5_1": 0.05, "Q5_0": 0.05, "Q4_1": 0.1, "Q4_0": 0.1}[kind]


def gguf_mistral(seed=0, layers=1):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return MistralForCausalLM(cfg).eval()


def test_a_mistral_model_exports_as_llama(tmp_path, tokenizer):
    model = gguf_mistral()
    quantize(model, ParetoQWeightOnlyConfig(bits=3))
    rep = export_gguf(model, tokenizer, tmp_path / "mistral.gguf")
    tensors, fields = _read(tmp_path / "mistral.gguf")
    assert bytes(fields["general.architecture"].parts[fields["general.architecture"].data[0]]).decode() == "llama"
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "Q3_K" and rep["inexact"] == []


# --------------------------------------------------------------------------- other families, RoPE scaling


def gguf_qwen(kind, seed=0, layers=1):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    shape = dict(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
        with torch.no_grad():  # q/k/v biases start at zero: make them count
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=64, **shape))
        with torch.no_grad():  # q/k norms start at one: make them count
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model.eval()


def gguf_llama_rope(rope, seed=0, layers=1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_scaling=rope)
    return LlamaForCausalLM(cfg).eval()


# Llama 3.1/3.2's scaling, with an original context short enough that the tests' positions feel it
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_qwen_families_export_with_their_own_tensors(tmp_path, tokenizer, kind):
    model = gguf_qwen(kind, layers=2)
    quantize(model, ParetoQWeightOnlyConfig(bits=2))
    rep = export_gguf(model, tokenizer, tmp_path / f"{kind}.gguf")
    assert rep["inexact"] == []
    tensors, fields = _read(tmp_path / f"{kind}.gguf")
    assert bytes(fields["general.architecture"].parts[fields["general.architecture"].data[0]]).decode() == kind
    assert _field(fields, f"{kind}.block_count") == 2 and _field(fields, f"{kind}.attention.key_length") == 64
    attn = model.model.layers[1].self_attn
    # Hugging Face's half-split rotary layout is llama.cpp's for these families: rows unchanged
    w = attn.q_proj.weight.dequantize().float().numpy()
    got = _dequant(tensors["blk.1.attn_q.weight"])
    assert np.all(np.abs(got - w) <= 2.0 ** -11 * np.abs(w) + 1e-12)
    if kind == "qwen2":
        for proj in ("q", "k", "v"):
            t = tensors[f"blk.1.attn_{proj}.bias"]
            assert t.tensor_type.name == "F32"
            assert np.array_equal(np.asarray(t.data), getattr(attn, f"{proj}_proj").bias.detach().numpy())
        assert "blk.1.attn_q_norm.weight" not in tensors
    else:
        assert np.array_equal(np.asarray(tensors["blk.1.attn_k_norm.weight"].data), attn.k_norm.weight.detach().numpy())
        assert "blk.1.attn_q.bias" not in tensors


def test_llama_biases_are_permuted_with_their_rows(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True)).eval()
    quantize(model, ParetoQWeightOnlyConfig(bits=4))
    tensors, _ = _read(export_gguf(model, tokenizer, tmp_path / "b.gguf")["path"])
    b = model.model.layers[0].self_attn.q_proj.bias.detach().numpy()
    order = np.arange(256).reshape(4, 2, 32).swapaxes(1, 2).reshape(256)
    assert np.array_equal(np.asarray(tensors["blk.0.attn_q.bias"].data), b[order])
    assert np.array_equal(np.asarray(tensors["blk.0.attn_v.bias"].data),
                          model.model.layers[0].self_attn.v_proj.bias.detach().numpy())


@pytest.mark.parametrize("rope", [LLAMA3_ROPE, {"rope_type": "linear", "factor": 4.0}])
def test_frequency_scaling_is_written_as_rope_freqs(tmp_path, tokenizer, rope):
    model = gguf_llama_rope(rope)
    quantize(model, ParetoQWeightOnlyConfig(bits=4))
    tensors, _ = _read(export_gguf(model, tokenizer, tmp_path / "r.gguf")["path"])
    f = np.asarray(tensors["rope_freqs.weight"].data)
    # oracle: llama.cpp divides each pair's angle by its factor, so factor = plain / the model's frequency
    inv = model.model.rotary_emb.inv_freq.double().numpy()
    plain = 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)
    assert f.shape == (32,) and np.allclose(f, plain / inv, rtol=1e-6)
    if rope["rope_type"] == "linear":
        assert np.allclose(f, 4.0)
    else:  # llama3: low frequencies slowed by the factor, a smooth band above (here from the first pair on)
        assert 1.0 < f[0] < 8.0 and f[-1] == pytest.approx(8.0) and np.all(np.diff(f) >= -1e-6)
        assert (np.abs(f - 8.0) < 1e-6).sum() > 16
    plain_model = gguf_llama_rope(None)
    quantize(plain_model, ParetoQWeightOnlyConfig(bits=4))
    assert "rope_freqs.weight" not in _read(export_gguf(plain_model, tokenizer, tmp_path / "p.gguf")["path"])[0]


def test_rope_kinds_it_cannot_write_are_refused(tmp_path, tokenizer):
    yarn = gguf_llama_rope({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    quantize(yarn, ParetoQWeightOnlyConfig(bits=4))
    with pytest.raises(ValueError, match="RoPE scaling 'yarn' is not supported for 'llama'"):
        export_gguf(yarn, tokenizer, tmp_path / "y.gguf")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    q = Qwen2ForCausalLM(Qwen2Config(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     rope_scaling={"rope_type": "linear", "factor": 2.0})).eval()
    quantize(q, ParetoQWeightOnlyConfig(bits=4))
    with pytest.raises(ValueError, match="RoPE scaling 'linear' is not supported for 'qwen2'"):
        export_gguf(q, tokenizer, tmp_path / "q.gguf")
    assert not list(tmp_path.glob("*.gguf"))
