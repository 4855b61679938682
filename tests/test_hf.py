"""Hugging Face workflow (paretoq_ao.hf): QAT on Llama / Qwen2 / Qwen3 / Mistral / Phi-3 built from
tiny local configs, packed save + ``AutoModelForCausalLM.from_pretrained`` reload, QAT checkpoints,
``load_model`` errors. No downloads."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn
from torchao import quantize_

import paretoq_ao
import paretoq_ao.hf as pq_hf
from paretoq_ao import ParetoQPackedTensor, ParetoQQATConfig, ParetoQQATWeight, ParetoQWeightOnlyConfig

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 160

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family -> (config class, model class, block linear names relative to a decoder layer)
_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _ATTN + _MLP, {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _ATTN + _MLP, {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _ATTN + _MLP, {"head_dim": 8}),
    "mistral": ("MistralConfig", "MistralForCausalLM", _ATTN + _MLP, {"head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                                "mlp.down_proj"), {}),
}


def make(family: str, tie: bool = False, seed: int = 0, dtype=torch.float32):
    cfg_name, model_name, _, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**COMMON, **extra, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    # built in ``dtype`` (not cast afterwards, which would also cast the fp32 rotary buffers that
    # from_pretrained keeps in fp32)
    model = getattr(transformers, model_name)._from_config(cfg, dtype=dtype)
    model.eval()
    return model


def block_linears(family, model):
    return {f"model.layers.{i}.{n}" for i in range(model.config.num_hidden_layers) for n in FAMILIES[family][2]}


def ids(seed=7, shape=(2, 11)):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(input_ids=x).logits


# ----------------------------------------------------------------------------- QAT on each family

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_filter_quantizes_exactly_the_block_linears(family):
    model = make(family)
    all_linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert block_linears(family, model) | {"lm_head"} == all_linears  # the table above is complete
    quantize_(model, ParetoQQATConfig(bits=2))
    assert set(pq_hf.qat_modules(model)) == block_linears(family, model)
    assert type(model.lm_head.weight) is nn.Parameter  # the head stays full precision
    assert type(model.model.embed_tokens.weight) is nn.Parameter
    out = model(input_ids=ids(), labels=ids())
    out.loss.backward()
    layer0 = model.model.layers[0]
    for name in FAMILIES[family][2]:
        lin = layer0.get_submodule(name)
        assert isinstance(lin.weight, ParetoQQATWeight)
        assert lin.weight.grad is not None and lin.weight_scale.grad is not None
        assert lin.weight_scale.grad.abs().sum() > 0


def test_phi3_fused_projections_quantize_like_separate_ones():
    """Per-row (and per-group along the input) scales never mix rows, so quantizing Phi-3's fused
    qkv_proj / gate_up_proj equals quantizing the q, k, v (gate, up) slices separately."""
    model = make("phi3")
    layer = model.model.layers[0]
    for lin, parts, gs in ((layer.self_attn.qkv_proj, [32, 16, 16], None), (layer.mlp.gate_up_proj, [48, 48], 16)):
        w = lin.weight.detach().clone()
        quantize_(lin, ParetoQQATConfig(bits=2, group_size=gs), filter_fn=lambda m, f: isinstance(m, nn.Linear))
        fused = lin.weight.fake_quantized()
        separate = []
        for piece in w.split(parts):
            scale = paretoq_ao.init_scale(piece, 2, gs)
            separate.append(paretoq_ao.fake_quantize(piece, scale, 2))
        assert torch.equal(fused, torch.cat(separate))


def test_tied_head_stays_full_precision_and_tied():
    model = make("qwen2", tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    quantize_(model, ParetoQQATConfig(bits=2))
    assert set(pq_hf.qat_modules(model)) == block_linears("qwen2", model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.lm_head.weight) is nn.Parameter


# ----------------------------------------------------------------------------- packed save / reload

@pytest.mark.parametrize("family,bits,group_size", [
    ("llama", 2, None), ("qwen2", 1, None), ("qwen3", 1.58, 8), ("mistral", 4, 16), ("phi3", 3, 16),
])
def test_save_quantized_reloads_with_from_pretrained(tmp_path, family, bits, group_size):
    model = make(family)
    quantize_(model, ParetoQQATConfig(bits=bits, group_size=group_size))
    quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size))
    x = ids()
    ref = logits(model, x)
    pq_hf.save_quantized(model, None, tmp_path)

    cfg = json.loads((tmp_path / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "paretoq" and q["layout"] == paretoq_ao.LAYOUT
    assert q["bits"] == bits and q["group_size"] == group_size
    assert set(q["modules"]) == block_linears(family, model)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__name__ == FAMILIES[family][1]
    assert set(pq_hf.packed_modules(loaded)) == block_linears(family, model)
    w = loaded.model.layers[1].get_submodule(FAMILIES[family][2][0]).weight
    assert isinstance(w, ParetoQPackedTensor) and w.bits == bits and w.group_size == group_size
    assert type(loaded.lm_head.weight) is nn.Parameter and loaded.lm_head.weight.dtype == torch.float32
    assert loaded.dtype == torch.float32
    assert torch.equal(logits(loaded, x), ref)
    # byte-for-byte the same packed codes and scales
    for name, t in model.state_dict().items():
        u = loaded.state_dict()[name]
        if isinstance(t, ParetoQPackedTensor):
            assert torch.equal(t.qdata, u.qdata) and torch.equal(t.scale, u.scale)
        else:
            assert torch.equal(t, u), name
    # the weights file is the one paretoq_ao.save_safetensors writes
    sd = paretoq_ao.load_safetensors(tmp_path / "model.safetensors")
    key = "model.layers.0." + FAMILIES[family][2][0] + ".weight"
    assert isinstance(sd[key], ParetoQPackedTensor) and torch.equal(sd[key].qdata, model.state_dict()[key].qdata)


def test_reloaded_model_save_pretrained_and_tied_head(tmp_path):
    model = make("llama", tie=True)
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))  # post-training (RTN) also saves
    x = ids()
    ref = logits(model, x)
    pq_hf.save_quantized(model, None, tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded, x), ref)
    loaded.save_pretrained(tmp_path / "b")  # transformers' own save of the reloaded packed model
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert isinstance(again.model.layers[0].mlp.up_proj.weight, ParetoQPackedTensor)
    assert torch.equal(logits(again, x), ref)


def test_bf16_packed_model_round_trips(tmp_path):
    model = make("mistral", dtype=torch.bfloat16)
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    x = ids()
    ref = logits(model, x)
    pq_hf.save_quantized(model, None, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.layers[0].mlp.up_proj.weight.scale.dtype == torch.bfloat16
    assert torch.equal(logits(loaded, x), ref)


def test_save_quantized_with_tokenizer_and_load_model(tmp_path):
    from paretoq_ao.data import train_tokenizer

    tok = train_tokenizer(["def f(x):\n    return x + 1\n" * 20, "class A:\n    pass\n" * 20], vocab_size=300)
    model = make("qwen3")
    quantize_(model, ParetoQWeightOnlyConfig(bits=4, group_size=8))
    pq_hf.save_quantized(model, tok, tmp_path)
    loaded, tok2 = pq_hf.load_model(tmp_path)
    assert tok2 is not None and tok2.get_vocab() == tok.get_vocab()
    assert tok2("def g(y): return y")["input_ids"] == tok("def g(y): return y")["input_ids"]
    assert not loaded.training
    x = ids()
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_save_quantized_failure_keeps_previous_save(tmp_path, monkeypatch):
    model = make("llama")
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    pq_hf.save_quantized(model, None, tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}

    other = make("llama", seed=1)
    quantize_(other, ParetoQWeightOnlyConfig(bits=3))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pq_hf, "save_safetensors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        pq_hf.save_quantized(other, None, tmp_path)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before  # no staging left
    monkeypatch.undo()
    x = ids()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path), x), logits(model, x))


def test_save_quantized_rejects_models_that_are_not_packed(tmp_path):
    model = make("llama")
    with pytest.raises(ValueError, match="no packed ParetoQ layers"):
        pq_hf.save_quantized(model, None, tmp_path)
    quantize_(model, ParetoQQATConfig(bits=2))
    with pytest.raises(ValueError, match="QAT weights"):
        pq_hf.save_quantized(model, None, tmp_path)
    assert not os.listdir(tmp_path)


def test_reload_with_missing_packed_tensor_fails_clearly(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make("llama")
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    pq_hf.save_quantized(model, None, tmp_path)
    path = tmp_path / "model.safetensors"
    sd = load_file(path)
    del sd["model.layers.1.mlp.down_proj.weight.qdata"]
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing 1 packed.*model\.layers\.1\.mlp\.down_proj\.weight\.qdata"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_unknown_layout_is_refused(tmp_path):
    model = make("llama")
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    pq_hf.save_quantized(model, None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["layout"] = "paretoq-other-v9"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="paretoq-other-v9"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- model.save_pretrained / push_to_hub

def _snapshot(folder):
    """{relative path: bytes} of every file under ``folder`` (None when it does not exist)."""
    if not os.path.exists(folder):
        return None
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def _check_reloads(model, folder, x, tokenizer=None):
    ref = logits(model, x)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert set(pq_hf.packed_modules(loaded)) == set(pq_hf.packed_modules(model))
    assert torch.equal(logits(loaded, x), ref)
    for name, t in model.state_dict().items():
        u = loaded.state_dict()[name]
        if isinstance(t, ParetoQPackedTensor):
            assert torch.equal(t.qdata, u.qdata) and torch.equal(t.scale, u.scale), name
            assert (u.bits, u.group_size, u.activations) == (t.bits, t.group_size, t.activations), name
        else:
            assert torch.equal(t, u), name
    via_load_model, tok = pq_hf.load_model(folder)
    assert torch.equal(logits(via_load_model, x), ref)
    if tokenizer is not None:
        assert tok is not None and tok.get_vocab() == tokenizer.get_vocab()
    return loaded


@pytest.mark.parametrize("family,bits,group_size,tie", [("llama", 2, None, False), ("qwen3", 1.58, 8, True),
                                                        ("phi3", 3, 16, False)])
def test_save_pretrained_of_a_converted_model_round_trips(tmp_path, family, bits, group_size, tie):
    """A model converted in this process (no hf_quantizer from from_pretrained) saves with
    transformers' save_pretrained into the folder save_quantized writes."""
    model = make(family, tie=tie)
    quantize_(model, ParetoQQATConfig(bits=bits, group_size=group_size))
    quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size))
    x = ids()
    model.save_pretrained(tmp_path / "hf")
    pq_hf.save_quantized(model, None, tmp_path / "pq")
    assert sorted(os.listdir(tmp_path / "hf")) == sorted(os.listdir(tmp_path / "pq")) == [
        "config.json", "generation_config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((tmp_path / "pq" / "config.json").read_text())["quantization_config"]
    assert set(cfg["quantization_config"]["modules"]) == block_linears(family, model)
    # the weights file is one that paretoq_ao.load_safetensors reads back to the same packed tensors
    sd = paretoq_ao.load_safetensors(tmp_path / "hf" / "model.safetensors")
    for name, t in model.state_dict().items():
        if isinstance(t, ParetoQPackedTensor):
            assert isinstance(sd[name], ParetoQPackedTensor) and torch.equal(sd[name].qdata, t.qdata), name
    loaded = _check_reloads(model, tmp_path / "hf", x)
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    # a reloaded model saves again the same way
    loaded.save_pretrained(tmp_path / "again")
    _check_reloads(model, tmp_path / "again", x)


def test_save_pretrained_over_a_save_quantized_folder(tmp_path):
    from paretoq_ao.data import train_tokenizer

    tok = train_tokenizer(["def f(x):\n    return x + 1\n" * 20, "class A:\n    pass\n" * 20], vocab_size=300)
    model = make("llama")
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    pq_hf.save_quantized(model, tok, tmp_path)
    before = _snapshot(tmp_path)
    x = ids()

    model.save_pretrained(tmp_path)
    after = _snapshot(tmp_path)
    assert sorted(after) == sorted(before)  # no file added or removed
    for name in before:
        if name not in ("config.json", "generation_config.json", "model.safetensors"):
            assert after[name] == before[name], name  # the tokenizer is untouched
    _check_reloads(model, tmp_path, x, tokenizer=tok)

    # a different packed model saved over it replaces it
    other = make("llama", seed=1)
    quantize_(other, ParetoQWeightOnlyConfig(bits=4, group_size=16))
    other.save_pretrained(tmp_path)
    _check_reloads(other, tmp_path, x, tokenizer=tok)


def test_save_pretrained_lists_layers_converted_later_and_int8_activations(tmp_path):
    model = make("llama")
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    quantize_(model, ParetoQWeightOnlyConfig(bits=4, group_size=16), filter_fn=lambda m, fqn: fqn == "lm_head")
    paretoq_ao.set_activations(model, "int8")
    model.save_pretrained(tmp_path)
    q = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert q["modules"]["lm_head"] == {"bits": 4, "group_size": 16} and q["bits"] is None
    loaded = _check_reloads(model, tmp_path, ids())
    assert loaded.lm_head.weight.activations == "int8"
    # save_quantized folders reload their int8 activations too
    pq_hf.save_quantized(model, None, tmp_path / "pq")
    _check_reloads(model, tmp_path / "pq", ids())


def test_save_pretrained_over_a_qat_checkpoint_folder(tmp_path):
    model = make("qwen2")
    quantize_(model, ParetoQQATConfig(bits=2))
    pq_hf.save_qat_checkpoint(model, tmp_path)
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    model.save_pretrained(tmp_path)  # paretoq_qat.json stays: the packed config.json wins
    assert (tmp_path / "paretoq_qat.json").exists()
    _check_reloads(model, tmp_path, ids())
    with pytest.raises(pq_hf.ModelLoadError, match="packed ParetoQ model saved over"):
        pq_hf.load_qat_checkpoint(tmp_path)


def test_save_pretrained_refuses_qat_models_before_writing(tmp_path):
    packed = make("llama")
    quantize_(packed, ParetoQWeightOnlyConfig(bits=2))
    pq_hf.save_quantized(packed, None, tmp_path / "out")
    before = _snapshot(tmp_path / "out")

    model = make("llama", seed=3)
    quantize_(model, ParetoQQATConfig(bits=2))
    for target in (tmp_path / "out", tmp_path / "new"):
        with pytest.raises(ValueError, match=r"QAT weights.*paretoq_ao\.hf\.save_qat_checkpoint.*nothing was written"):
            model.save_pretrained(target)
    assert _snapshot(tmp_path / "out") == before  # byte for byte
    assert not (tmp_path / "new").exists()  # not even the folder
    x = ids()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), x), logits(packed, x))
    # converted, the same model saves
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    model.save_pretrained(tmp_path / "new")
    _check_reloads(model, tmp_path / "new", x)


class _FakeHub:
    """Stands in for transformers' HfApi in push_to_hub: records calls, keeps the uploaded files."""

    def __init__(self, root):
        self.root, self.calls = root, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        import shutil

        self.calls.append(("create_commit", repo_id))
        for op in operations:
            dest = self.root / repo_id / op.path_in_repo
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, dest)
        return "commit"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    import transformers.utils.hub as tf_hub

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = _FakeHub(tmp_path / "hub")
    monkeypatch.setattr(tf_hub, "_hf_api", hub)

    class Card:
        def save(self, path):
            with open(path, "w", encoding="utf-8") as f:
                f.write("card\n")

    monkeypatch.setattr(tf_hub, "create_and_tag_model_card", lambda *a, **k: Card())
    return hub


def test_push_to_hub_uploads_the_packed_folder(tmp_path, fake_hub):
    model = make("mistral")
    quantize_(model, ParetoQWeightOnlyConfig(bits=2, group_size=16))
    model.push_to_hub("org/packed")
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "create_commit"]
    uploaded = fake_hub.root / "org/packed"
    assert sorted(os.listdir(uploaded)) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    _check_reloads(model, uploaded, ids())


def test_push_to_hub_refuses_qat_models_before_creating_the_repo(tmp_path, monkeypatch, fake_hub):
    monkeypatch.chdir(tmp_path)
    model = make("llama")
    quantize_(model, ParetoQQATConfig(bits=2))
    with pytest.raises(ValueError, match="save_qat_checkpoint"):
        model.save_pretrained("org-qat", push_to_hub=True)
    assert not os.path.exists("org-qat")
    # push_to_hub creates the repo before it saves; nothing is uploaded
    with pytest.raises(ValueError, match="save_qat_checkpoint"):
        model.push_to_hub("org/qat")
    assert ("create_commit", "org/qat") not in fake_hub.calls


# ----------------------------------------------------------------------------- QAT checkpoints

@pytest.mark.parametrize("family,tie,group_size", [("llama", False, None), ("qwen2", True, 16), ("phi3", False, 8)])
def test_qat_checkpoint_resumes_exactly(tmp_path, family, tie, group_size):
    model = make(family, tie=tie)
    quantize_(model, ParetoQQATConfig(bits=2, group_size=group_size))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = ids(shape=(2, 16))
    model.train()
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    ref = logits(model, x)
    pq_hf.save_qat_checkpoint(model, tmp_path)
    assert json.loads((tmp_path / "paretoq_qat.json").read_text())["modules"].keys() == block_linears(family, model)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())

    resumed, _ = pq_hf.load_qat_checkpoint(tmp_path)
    assert resumed.training
    assert set(pq_hf.qat_modules(resumed)) == block_linears(family, model)
    if tie:
        assert resumed.lm_head.weight is resumed.model.embed_tokens.weight
    resumed.eval()
    assert torch.equal(logits(resumed, x), ref)
    for name, t in model.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name

    # training continues identically, and both convert to the same packed model
    for m in (model, resumed):
        m.train()
        o = torch.optim.SGD(m.parameters(), lr=0.1)
        m(input_ids=x, labels=x).loss.backward()
        o.step()
        m.eval()
    assert torch.equal(logits(resumed, x), logits(model, x))
    via_load_model, _ = pq_hf.load_model(tmp_path)
    assert set(pq_hf.qat_modules(via_load_model)) == block_linears(family, model)
    # converting and saving packed into the same folder replaces the QAT checkpoint
    quantize_(model, ParetoQWeightOnlyConfig(bits=2, group_size=group_size))
    pq_hf.save_quantized(model, None, tmp_path)
    packed, _ = pq_hf.load_model(tmp_path)
    assert set(pq_hf.packed_modules(packed)) == block_linears(family, model)
    assert torch.equal(logits(packed, x), logits(model, x))


def test_qat_checkpoint_rejects_wrong_models(tmp_path):
    model = make("llama")
    with pytest.raises(ValueError, match="no ParetoQ QAT layers"):
        pq_hf.save_qat_checkpoint(model, tmp_path)
    with pytest.raises(pq_hf.ModelLoadError, match="paretoq_qat.json"):
        pq_hf.load_qat_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- load_model

def test_load_model_local_folder_and_dtype(tmp_path):
    model = make("qwen2")
    model.save_pretrained(tmp_path)
    loaded, tok = pq_hf.load_model(tmp_path)
    assert tok is None and not loaded.training
    x = ids()
    assert torch.equal(logits(loaded, x), logits(model, x))
    bf, _ = pq_hf.load_model(str(tmp_path), dtype="bfloat16")
    assert bf.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        pq_hf.load_model(tmp_path, dtype="float-ish")


def test_load_model_unknown_hub_id_offline(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(pq_hf.ModelLoadError, match="could not be found locally or downloaded") as e:
        pq_hf.load_model("paretoq-test-org/no-such-model-xyz")
    assert "paretoq-test-org/no-such-model-xyz" in str(e.value)
    assert isinstance(e.value, OSError)


def test_load_model_bad_local_paths(tmp_path):
    with pytest.raises(pq_hf.ModelLoadError, match="no such folder"):
        pq_hf.load_model(tmp_path / "missing" / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(pq_hf.ModelLoadError, match="no config.json"):
        pq_hf.load_model(tmp_path / "empty")
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(pq_hf.ModelLoadError, match="is a file"):
        pq_hf.load_model(tmp_path / "f.bin")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"model_type": "llama", **COMMON}))
    with pytest.raises(pq_hf.ModelLoadError, match="broken"):  # config but no weights
        pq_hf.load_model(tmp_path / "broken")


def test_importing_paretoq_ao_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys, paretoq_ao; bad = [m for m in ('transformers', 'datasets') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_save_pretrained_works_without_importing_paretoq_ao_hf_first(tmp_path):
    """A user who never imports paretoq_ao.hf: quantize_ on a transformers model still marks it
    quantized, so save_pretrained writes a folder from_pretrained reloads exactly."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from torchao import quantize_
        from paretoq_ao import ParetoQWeightOnlyConfig
        assert "paretoq_ao.hf" not in sys.modules
        torch.manual_seed(0)
        m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
        quantize_(m, ParetoQWeightOnlyConfig(bits=2))
        m.save_pretrained({str(tmp_path / 'out')!r})
        from transformers import AutoModelForCausalLM
        r = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}).eval()
        ids = torch.tensor([[1, 2, 3]])
        with torch.no_grad():
            assert torch.equal(m(ids).logits, r(ids).logits)
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]
