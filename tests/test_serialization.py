"""Saving and loading packed models: torch.save / torch.load(weights_only=True), safetensors, atomic
writes, and checkpoints whose format differs from the model's."""

from __future__ import annotations

import json
import os
import pickle
import stat

import pytest
import torch
from torchao import quantize_

import paretoq_ao
from paretoq_ao import ParetoQPackedTensor, ParetoQQATConfig, ParetoQWeightOnlyConfig

pytestmark = pytest.mark.usefixtures("single_thread")

ALL_BITS = [1, 1.58, 2, 3, 4]
GRANULARITIES = [None, 16]
BITS_X_GRAN = [(b, g) for b in ALL_BITS for g in GRANULARITIES]
IDS = [f"{b}-{'row' if g is None else f'g{g}'}" for b, g in BITS_X_GRAN]


def _converted(make_decoder, tokens, bits, group_size, seed=0, tie=False, qat_steps=2):
    """A QAT-trained (so scales differ from their init) and converted TinyDecoder."""
    model = make_decoder(seed=seed, tie=tie)
    quantize_(model, ParetoQQATConfig(bits=bits, group_size=group_size))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(qat_steps):
        opt.zero_grad()
        model.loss(tokens).backward()
        opt.step()
    quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size))
    return model


def _fresh_converted(make_decoder, bits, group_size, tie=False):
    """A converted model with other values (another seed, post-training), same format."""
    model = make_decoder(seed=99, tie=tie)
    quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size))
    return model


def _assert_same_packed(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        w = sb[k]
        assert type(v) is type(w), k
        if isinstance(v, ParetoQPackedTensor):
            assert (v.bits, v.group_size, v.shape) == (w.bits, w.group_size, w.shape), k
            assert torch.equal(v.qdata, w.qdata) and torch.equal(v.scale, w.scale), k
        else:
            assert torch.equal(v, w), k


@pytest.mark.parametrize("bits,group_size", BITS_X_GRAN, ids=IDS)
def test_torch_save_load_weights_only_roundtrip(make_decoder, tokens, tmp_path, bits, group_size):
    model = _converted(make_decoder, tokens, bits, group_size)
    with torch.no_grad():
        expected = model(tokens)
    path = tmp_path / "packed.pt"
    torch.save(model.state_dict(), path)

    sd = torch.load(path, weights_only=True)
    for n in model.block_linear_names():
        t = sd[f"{n}.weight"]
        assert isinstance(t, ParetoQPackedTensor) and t.bits == bits and t.group_size == group_size
        assert t.qdata.dtype == torch.uint8
    fresh = _fresh_converted(make_decoder, bits, group_size)
    with torch.no_grad():
        assert not torch.allclose(fresh(tokens), expected, atol=1e-3)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh(tokens), expected)
    _assert_same_packed(fresh, model)


@pytest.mark.parametrize("bits,group_size", BITS_X_GRAN, ids=IDS)
def test_safetensors_roundtrip(make_decoder, tokens, tmp_path, bits, group_size):
    from safetensors import safe_open

    model = _converted(make_decoder, tokens, bits, group_size)
    with torch.no_grad():
        expected = model(tokens)
    path = tmp_path / "packed.safetensors"
    paretoq_ao.save_safetensors(model, path, metadata={"note": "tiny"})
    assert sorted(os.listdir(tmp_path)) == ["packed.safetensors"]

    # the file holds plain tensors: <name>.qdata (uint8) and <name>.scale for every packed weight
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        for n in model.block_linear_names():
            packed = model.get_submodule(n).weight
            assert f"{n}.weight" not in keys
            assert torch.equal(f.get_tensor(f"{n}.weight.qdata"), packed.qdata)
            assert torch.equal(f.get_tensor(f"{n}.weight.scale"), packed.scale)
        assert torch.equal(f.get_tensor("lm_head.weight"), model.lm_head.weight.detach())
    assert meta["note"] == "tiny" and meta["format"] == "pt"
    info = json.loads(meta["paretoq_ao"])
    assert info["layout"] == paretoq_ao.LAYOUT
    assert set(info["tensors"]) == {f"{n}.weight" for n in model.block_linear_names()}
    for n in model.block_linear_names():
        d = info["tensors"][f"{n}.weight"]
        assert float(d["bits"]) == float(bits) and d["shape"] == list(model.get_submodule(n).weight.shape)

    sd = paretoq_ao.load_safetensors(path)
    assert set(sd) == set(model.state_dict())
    fresh = _fresh_converted(make_decoder, bits, group_size)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh(tokens), expected)
    _assert_same_packed(fresh, model)

    # a state dict (not a module) is accepted too
    path2 = tmp_path / "sd.safetensors"
    paretoq_ao.save_safetensors(model.state_dict(), path2)
    sd2 = paretoq_ao.load_safetensors(path2)
    assert sd2.keys() == sd.keys()
    for k in sd:
        a, b = sd[k], sd2[k]
        assert type(a) is type(b)
        if isinstance(a, ParetoQPackedTensor):
            assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale) and a.bits == b.bits
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("bits,group_size", [(2, None), (1.58, 16)], ids=["2-row", "1.58-g16"])
def test_safetensors_with_tied_embedding_and_head(make_decoder, make_llama, tokens, tmp_path, bits, group_size):
    model = _converted(make_decoder, tokens, bits, group_size, tie=True)
    assert model.lm_head.weight is model.embed.weight
    with torch.no_grad():
        expected = model(tokens)
    path = tmp_path / "tied.safetensors"
    paretoq_ao.save_safetensors(model, path)
    sd = paretoq_ao.load_safetensors(path)
    assert torch.equal(sd["embed.weight"], sd["lm_head.weight"])
    fresh = _fresh_converted(make_decoder, bits, group_size, tie=True)
    fresh.load_state_dict(sd)
    assert fresh.lm_head.weight is fresh.embed.weight
    with torch.no_grad():
        assert torch.equal(fresh(tokens), expected)

    # a Hugging Face Llama with tie_word_embeddings
    llama = make_llama(tie=True)
    quantize_(llama, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size))
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        expected = llama(input_ids=ids).logits
    path = tmp_path / "llama.safetensors"
    paretoq_ao.save_safetensors(llama, path)
    other = make_llama(seed=5, tie=True)
    quantize_(other, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size))
    other.load_state_dict(paretoq_ao.load_safetensors(path))
    assert other.lm_head.weight is other.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, expected)


# --------------------------------------------------------------------------------------------------
# Atomic save
# --------------------------------------------------------------------------------------------------


def test_save_roundtrip_and_replace(tmp_path):
    path = tmp_path / "obj.pt"
    paretoq_ao.save({"a": torch.arange(5)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(5))
    paretoq_ao.save({"a": torch.arange(7)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(7))
    assert os.listdir(tmp_path) == ["obj.pt"]


def test_save_is_atomic_when_pickling_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    paretoq_ao.save({"step": torch.tensor(1), "w": torch.randn(8, 8)}, path)
    before = path.read_bytes()
    big = torch.randn(256, 256)  # written to the temporary file before pickling fails
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        paretoq_ao.save({"w": big, "fn": lambda x: x}, path)
    assert path.read_bytes() == before
    assert torch.equal(torch.load(path, weights_only=True)["step"], torch.tensor(1))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    paretoq_ao.save({"v": torch.tensor(1)}, path)
    before = path.read_bytes()

    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        paretoq_ao.save({"v": torch.tensor(2)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_save_safetensors_failure_keeps_previous_file(make_decoder, tmp_path):
    model = make_decoder()
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    path = tmp_path / "m.safetensors"
    paretoq_ao.save_safetensors(model, path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="bad"):
        paretoq_ao.save_safetensors({"x": torch.ones(2), "bad": 3}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


# --------------------------------------------------------------------------------------------------
# Checkpoints in another format
# --------------------------------------------------------------------------------------------------

MISMATCHES = [((2, None), (1.58, None), ["bits=2", "bits=1.58"]),
              ((2, 16), (2, None), ["group_size=16", "group_size=None"]),
              ((3, None), (4, 8), ["bits=3", "bits=4"])]


@pytest.mark.parametrize("saved,model_fmt,words", MISMATCHES, ids=["bits", "group", "both"])
def test_loading_packed_checkpoint_of_other_format_names_the_difference(make_decoder, tokens, saved, model_fmt,
                                                                       words):
    src = _converted(make_decoder, tokens, *saved, qat_steps=0)
    dst = _fresh_converted(make_decoder, *model_fmt)
    with pytest.raises((ValueError, RuntimeError)) as info:
        dst.load_state_dict(src.state_dict())
    msg = str(info.value)
    for w in words:
        assert w in msg, msg
    # the model keeps its own format
    for n in dst.block_linear_names():
        w = dst.get_submodule(n).weight
        assert (w.bits, w.group_size) == model_fmt


@pytest.mark.parametrize("saved,model_fmt,words", MISMATCHES, ids=["bits", "group", "both"])
def test_loading_packed_checkpoint_of_other_format_raises_value_error(make_decoder, tokens, tmp_path, saved,
                                                                     model_fmt, words):
    src = _converted(make_decoder, tokens, *saved, qat_steps=0)
    path = tmp_path / "src.safetensors"
    paretoq_ao.save_safetensors(src, path)
    dst = _fresh_converted(make_decoder, *model_fmt)
    with pytest.raises(ValueError) as info:
        dst.load_state_dict(paretoq_ao.load_safetensors(path))
    for w in words:
        assert w in str(info.value)


def test_loading_plain_checkpoint_into_converted_model_names_the_problem(make_decoder):
    src = make_decoder(seed=1)
    dst = _fresh_converted(make_decoder, 2, None)
    with pytest.raises(ValueError, match="holds a plain .* weight but the model.s layer is packed"):
        dst.load_state_dict(src.state_dict())


def test_loading_packed_checkpoint_into_unconverted_model_names_the_problem(make_decoder, tokens):
    src = _converted(make_decoder, tokens, 3, 16, qat_steps=0)
    dst = make_decoder(seed=1)
    with pytest.raises((ValueError, RuntimeError)) as info:
        dst.load_state_dict(src.state_dict())
    msg = str(info.value)
    assert "has no attribute" not in msg, msg
    assert "bits=3" in msg and "group_size=16" in msg, msg


def test_saved_files_get_normal_permissions(tmp_path):
    """Files are written through a temporary file, but land with the mode a plain ``open`` would
    give them (0666 less the umask), and a replaced file keeps its mode."""
    umask = os.umask(0o022)
    try:
        new = tmp_path / "w.pt"
        paretoq_ao.save({"w": torch.ones(2)}, new)
        assert stat.S_IMODE(os.stat(new).st_mode) == 0o644
        st = tmp_path / "w.safetensors"
        paretoq_ao.save_safetensors({"w": torch.ones(2)}, st)
        assert stat.S_IMODE(os.stat(st).st_mode) == 0o644
        os.chmod(new, 0o640)
        paretoq_ao.save({"w": torch.zeros(2)}, new)
        assert stat.S_IMODE(os.stat(new).st_mode) == 0o640
    finally:
        os.umask(umask)


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    """What a save killed with kill -9 leaves (a checkpoint folder being built, a temporary
    `latest`, the staging folder of save_quantized, the older `.tmp-checkpoint-<step>-<pid>`
    folders) goes on the next start; temporaries of live writers and of other hosts stay."""
    import socket

    from paretoq_ao.serialization import remove_stale_temporaries, temp_name

    host, dead = socket.gethostname(), _dead_pid()
    stale = [f".tmp-{host}+{dead}+checkpoint-00000004", f".tmp-{host}+{dead}+x1y2-latest",
             f".tmp-checkpoint-00000002-{dead}"]
    kept = [temp_name("checkpoint-00000006"), f".tmp-other-host+{dead}+checkpoint-00000004",
            "checkpoint-00000002", "latest"]
    for name in stale[:1] + stale[2:] + kept[:3]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / stale[1]).write_text("checkpoint-00000004\n")
    (tmp_path / "latest").write_text("checkpoint-00000002\n")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(os.path.basename(p) for p in removed) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_atomic_write_clears_temporaries_a_killed_save_left(tmp_path):
    import socket

    leftover = tmp_path / f".tmp-{socket.gethostname()}+{_dead_pid()}+abcd-w.pt"
    leftover.write_bytes(b"partial")
    paretoq_ao.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    assert os.listdir(tmp_path) == ["w.pt"]
