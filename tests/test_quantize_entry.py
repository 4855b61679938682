"""``paretoq_ao.quantize`` / ``quantize_layers``: the explicit entry point gives the whole-model
guarantees without looking at torchao's call (``_torchao_call`` is disabled in these tests), it
converts exactly what a direct ``quantize_`` call converts, and a direct call on a torchao whose
signature this project cannot read gets the documented per-layer guarantee, with a warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torchao import quantize_
from torchao.quantization import Int8WeightOnlyConfig

import paretoq_ao
from paretoq_ao import (ParetoQPackedTensor, ParetoQQATConfig, ParetoQQATWeight, ParetoQWeightOnlyConfig,
                        quantize, quantize_layers)
from paretoq_ao import _targets, _torchao_call

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = {"qat": lambda **kw: ParetoQQATConfig(**kw), "convert": lambda **kw: ParetoQWeightOnlyConfig(**kw)}
KINDS = {"qat": ParetoQQATWeight, "convert": ParetoQPackedTensor}


@pytest.fixture
def no_call_lookup(monkeypatch):
    """The entry point must not need to find a torchao call: any lookup fails the test."""
    def refuse(config):
        raise AssertionError("paretoq_ao.quantize looked for torchao's quantize_ call")

    monkeypatch.setattr(_torchao_call, "find_call", refuse)


def _kinds(model):
    return {n: type(m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _state(model):
    out = {}
    for k, v in model.state_dict().items():
        if isinstance(v, ParetoQPackedTensor):
            out[k] = (v.qdata.clone(), v.scale.clone())
        else:
            out[k] = (v.detach().as_subclass(torch.Tensor).clone(),)
    return out


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("bits,group_size", [(2, None), (1.58, 16), (3, 8)])
def test_entry_point_converts_what_a_direct_call_converts(make_decoder, kind, bits, group_size, no_call_lookup,
                                                          monkeypatch):
    a, b = make_decoder(seed=3), make_decoder(seed=3)
    quantize(a, CONFIGS[kind](bits=bits, group_size=group_size))
    monkeypatch.undo()  # the direct call below does use the lookup
    quantize_(b, CONFIGS[kind](bits=bits, group_size=group_size))
    assert _kinds(a) == _kinds(b)
    assert _kinds(a)["lm_head"] is nn.Parameter  # the head stays full precision
    assert all(t is KINDS[kind] for n, t in _kinds(a).items() if n != "lm_head")
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert all(torch.equal(x, y) for x, y in zip(sa[k], sb[k])), k


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_entry_point_names_every_bad_layer_before_any_change(make_decoder, kind, no_call_lookup):
    model = make_decoder(n_layers=3)
    with torch.no_grad():
        model.blocks[2].down.weight[0, 0] = float("nan")  # the last layer torchao would visit
        model.blocks[0].up.weight[3, 1] = float("inf")
    before = _state(model)
    with pytest.raises(ValueError) as e:
        quantize(model, CONFIGS[kind](bits=2, group_size=16))
    msg = str(e.value)
    assert "no layer was changed" in msg and "'blocks.2.down'" in msg and "'blocks.0.up'" in msg
    assert all(t is nn.Parameter for t in _kinds(model).values())
    after = _state(model)
    assert all(torch.allclose(before[k][0], after[k][0], rtol=0, atol=0, equal_nan=True) for k in before)


def test_entry_point_refuses_a_head_tied_to_a_module_left_out(make_decoder, no_call_lookup):
    model = make_decoder(tie=True)
    with pytest.raises(ValueError, match=r"layer 'lm_head'.*tied to 'embed'"):
        quantize(model, ParetoQWeightOnlyConfig(bits=2), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    assert model.lm_head.weight is model.embed.weight
    assert all(t is nn.Parameter for t in _kinds(model).values())


def test_entry_point_converts_a_shared_weight_once(no_call_lookup):
    shared = nn.Linear(16, 16, bias=False)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
    model.add_module("a", shared)
    model.add_module("b", shared)  # one module under two names: visited twice, converted once
    other = nn.Linear(16, 16, bias=False)
    other.weight = shared.weight  # and a second module holding the same weight
    model.add_module("c", other)
    quantize(model, ParetoQWeightOnlyConfig(bits=2))
    assert isinstance(shared.weight, ParetoQPackedTensor)
    assert other.weight is shared.weight  # still one tensor


def test_quantize_layers_mixes_formats_and_checks_every_group_first(make_decoder, no_call_lookup):
    model = make_decoder()
    q2, q4 = ParetoQQATConfig(bits=2), ParetoQQATConfig(bits=4, group_size=16)
    with torch.no_grad():
        model.blocks[1].up.weight[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"'blocks\.1\.up'.*Inf"):
        quantize_layers(model, {"blocks.0.proj": q2, "blocks.1.up": q4})
    assert all(t is nn.Parameter for t in _kinds(model).values())  # the first group was not applied
    with torch.no_grad():
        model.blocks[1].up.weight[1, 1] = 0.0
    quantize_layers(model, {"blocks.0.proj": q2, "blocks.1.up": q4, "lm_head": q2})
    w = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert (w["blocks.0.proj"].bits, w["blocks.0.proj"].group_size) == (2, None)
    assert (w["blocks.1.up"].bits, w["blocks.1.up"].group_size) == (4, 16)
    assert isinstance(w["lm_head"], ParetoQQATWeight)  # named explicitly: no head rule
    assert type(w["blocks.0.up"]) is nn.Parameter
    with pytest.raises(ValueError, match=r"no layer\(s\) \['blocks\.7\.up'\]"):
        quantize_layers(model, {"blocks.7.up": q2})


def test_entry_point_marks_a_hugging_face_model_for_save_pretrained(make_llama, tmp_path, no_call_lookup):
    model = make_llama()
    quantize(model, ParetoQWeightOnlyConfig(bits=2))
    from paretoq_ao.workflow.hf import ParetoQHfQuantizer

    assert isinstance(model.hf_quantizer, ParetoQHfQuantizer)
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_entry_point_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        quantize({}, ParetoQQATConfig(bits=2))
    with pytest.raises(TypeError, match="config must be one of ParetoQQATConfig, ParetoQWeightOnlyConfig, "
                                        "got Int8WeightOnlyConfig"):
        quantize(nn.Linear(8, 8), Int8WeightOnlyConfig())


def test_the_pinned_torchao_signature_is_readable():
    # If a torchao release renames quantize_'s parameters this fails, and the README's promise
    # for direct calls must be revisited.
    assert _torchao_call._signature() is not None


def test_direct_call_on_an_unreadable_torchao_gets_the_per_layer_guarantee(make_decoder, monkeypatch):
    monkeypatch.setattr(_torchao_call, "_signature", lambda: None)
    monkeypatch.setattr(_torchao_call, "_WARNED", [])
    model = make_decoder(n_layers=2)
    with pytest.warns(UserWarning, match="paretoq_ao.quantize"):
        quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    assert isinstance(model.lm_head.weight, ParetoQPackedTensor)  # no head rule without the model
    bad = make_decoder(n_layers=2)
    with torch.no_grad():
        bad.blocks[1].down.weight[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, not per call
        with pytest.raises(ValueError, match=r"to this layer \(layers converted before it stay converted\): "
                                             r"layer '<module>' \(Linear with weight \(48, 80\)\)"):
            quantize_(bad, ParetoQWeightOnlyConfig(bits=2))
    assert isinstance(bad.blocks[0].proj.weight, ParetoQPackedTensor)  # converted before the bad one
    # the entry point still gives the whole-model guarantee
    again = make_decoder(n_layers=2)
    with torch.no_grad():
        again.blocks[1].down.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="no layer was changed"):
        quantize(again, ParetoQWeightOnlyConfig(bits=2))
    assert all(t is nn.Parameter for t in _kinds(again).values())


def test_public_names():
    assert paretoq_ao.quantize is _targets.quantize and paretoq_ao.default_filter(nn.Linear(2, 2), "x")
    assert not paretoq_ao.default_filter(nn.Embedding(2, 2), "x")
