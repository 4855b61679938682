"""Bad configurations and bad models: clear ValueErrors that say what is wrong, and the model left
untouched whenever a quantize_ call is refused."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torchao import quantize_

from paretoq_ao import ParetoQPackedTensor, ParetoQQATConfig, ParetoQQATWeight, ParetoQWeightOnlyConfig

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = [ParetoQQATConfig, ParetoQWeightOnlyConfig]
CFG_IDS = ["qat", "convert"]


def snapshot(model):
    """Everything a refused quantize_ call must leave unchanged."""
    return {
        "types": {n: type(p) for n, p in model.named_parameters()},
        "ids": {n: id(p) for n, p in model.named_parameters()},
        "buffers": sorted(n for n, _ in model.named_buffers()),
        "sd": {k: (type(v), v.clone() if not isinstance(v, ParetoQPackedTensor) else (v.qdata.clone(), v.scale.clone()))
               for k, v in model.state_dict().items()},
        "attrs": {n: sorted(m._parameters) for n, m in model.named_modules()},
    }


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now["types"] == snap["types"]
    assert now["ids"] == snap["ids"]
    assert now["buffers"] == snap["buffers"]
    assert now["attrs"] == snap["attrs"]
    assert now["sd"].keys() == snap["sd"].keys()
    for k, (t, v) in snap["sd"].items():
        t2, v2 = now["sd"][k]
        assert t2 is t, k
        if isinstance(v, tuple):
            assert all(torch.equal(a, b) for a, b in zip(v, v2)), k
        else:
            assert torch.equal(v2, v) or (torch.isnan(v).any() and torch.equal(v2.nan_to_num(), v.nan_to_num())), k


# --------------------------------------------------------------------------------------------------
# Config arguments
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("bits", [0, 5, 2.5, "x", -1, 8, True, None, 1.5])
def test_bits_outside_allowed_values(cfg, bits):
    with pytest.raises(ValueError, match=r"allowed values are 1, 1\.58, 2, 3, 4") as info:
        cfg(bits=bits)
    assert repr(bits) in str(info.value)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("bits,expected", [(1, 1), (2.0, 2), ("1.58", 1.58), ("ternary", 1.58), (4, 4)])
def test_valid_bits_spellings_are_normalised(cfg, bits, expected):
    assert cfg(bits=bits).bits == expected


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("group_size", [0, -1, -16, 3.5, 16.0, True, "16"])
def test_invalid_group_size_values(cfg, group_size):
    with pytest.raises(ValueError, match="group_size must be a positive int or None") as info:
        cfg(bits=2, group_size=group_size)
    assert repr(group_size) in str(info.value)


# --------------------------------------------------------------------------------------------------
# Layers that cannot be quantized: refused before any layer changes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("group_size", [24, 32])
def test_group_size_not_dividing_in_features(make_decoder, cfg, group_size):
    model = make_decoder()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="no layer was changed") as info:
        quantize_(model, cfg(bits=2, group_size=group_size))
    msg = str(info.value)
    # 24 divides 48 but not 80: only the down projections (in_features=80) are named
    assert re.search(rf"'blocks\.0\.down' \(Linear with weight \(48, 80\)\).*group_size={group_size} does not divide "
                     r"in_features=80", msg), msg
    assert "'blocks.1.down'" in msg
    assert ("'blocks.0.up'" in msg) == (group_size == 32)
    if group_size == 32:
        assert "in_features=48" in msg
    assert "lm_head" not in msg
    assert_unchanged(model, snap)


def test_group_size_error_when_converting_a_plain_model_keeps_model(make_decoder, tokens):
    model = make_decoder()
    with torch.no_grad():
        before = model(tokens)
    with pytest.raises(ValueError, match=r"'blocks\.0\.down'.*in_features=80"):
        quantize_(model, ParetoQWeightOnlyConfig(bits=3, group_size=24))
    with torch.no_grad():
        assert torch.equal(model(tokens), before)


def _int_weight(model, fqn):
    lin = model.get_submodule(fqn)
    lin.weight = nn.Parameter(torch.randint(-3, 3, tuple(lin.weight.shape), dtype=torch.int32), requires_grad=False)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_non_floating_weight(make_decoder, cfg):
    model = make_decoder()
    _int_weight(model, "blocks.1.up")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'blocks\.1\.up' \(Linear with weight \(80, 48\)\).*torch\.int32 is not "
                                         r"floating point"):
        quantize_(model, cfg(bits=2))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_nonfinite_weight(make_decoder, cfg, bad):
    model = make_decoder()
    with torch.no_grad():
        model.blocks[1].proj.weight[3, 5] = bad
        model.blocks[0].down.weight[0, 0] = bad
        model.blocks[0].down.weight[1, 1] = bad
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"NaN/Inf") as info:
        quantize_(model, cfg(bits=3, group_size=16))
    msg = str(info.value)
    assert re.search(r"'blocks\.1\.proj' \(Linear with weight \(48, 48\)\): weight holds 1 NaN/Inf", msg), msg
    assert re.search(r"'blocks\.0\.down' \(Linear with weight \(48, 80\)\): weight holds 2 NaN/Inf", msg), msg
    assert "'blocks.0.up'" not in msg
    assert_unchanged(model, snap)


def test_nonfinite_latent_weight_when_converting_qat_model(make_decoder, tokens):
    model = make_decoder()
    quantize_(model, ParetoQQATConfig(bits=2))
    with torch.no_grad():
        model.blocks[0].up.weight[2, 2] = float("nan")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'blocks\.0\.up' .*weight holds 1 NaN/Inf"):
        quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    assert_unchanged(model, snap)
    for n in model.block_linear_names():
        assert isinstance(model.get_submodule(n).weight, ParetoQQATWeight)


def test_nonfinite_scale_when_converting_qat_model(make_decoder):
    model = make_decoder()
    quantize_(model, ParetoQQATConfig(bits=4, group_size=16))
    with torch.no_grad():
        model.blocks[1].down.weight_scale[0, 1] = float("inf")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'blocks\.1\.down' .*NaN/Inf"):
        quantize_(model, ParetoQWeightOnlyConfig(bits=4, group_size=16))
    assert_unchanged(model, snap)


# --------------------------------------------------------------------------------------------------
# Applying configs in the wrong order / twice
# --------------------------------------------------------------------------------------------------


def test_qat_config_applied_twice(make_decoder):
    model = make_decoder()
    quantize_(model, ParetoQQATConfig(bits=2))
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'blocks\.0\.proj'.*already has a ParetoQ QAT weight \(bits=2, "
                                         r"group_size=None\); ParetoQQATConfig must be applied once"):
        quantize_(model, ParetoQQATConfig(bits=2))
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="already has a ParetoQ QAT weight"):
        quantize_(model, ParetoQQATConfig(bits=3, group_size=16))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("from_qat", [False, True], ids=["ptq", "qat"])
def test_convert_applied_twice(make_decoder, from_qat):
    model = make_decoder()
    if from_qat:
        quantize_(model, ParetoQQATConfig(bits=1.58, group_size=16))
    quantize_(model, ParetoQWeightOnlyConfig(bits=1.58, group_size=16))
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'blocks\.0\.proj'.*already converted to packed 1\.58-bit weights "
                                         r"\(group_size=16\)"):
        quantize_(model, ParetoQWeightOnlyConfig(bits=1.58, group_size=16))
    assert_unchanged(model, snap)


def test_qat_on_converted_model(make_decoder):
    model = make_decoder()
    quantize_(model, ParetoQWeightOnlyConfig(bits=3))
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'blocks\.1\.down'.*already holds packed 3-bit weights; QAT needs the "
                                         r"full-precision model"):
        quantize_(model, ParetoQQATConfig(bits=3))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("qat,conv,words", [
    ((2, None), (1.58, None), ["bits=2, group_size=None", "bits=1.58, group_size=None"]),
    ((2, 16), (2, None), ["bits=2, group_size=16", "bits=2, group_size=None"]),
    ((2, None), (2, 16), ["bits=2, group_size=None", "bits=2, group_size=16"]),
    ((4, 8), (3, 16), ["bits=4, group_size=8", "bits=3, group_size=16"]),
], ids=["bits", "group-vs-row", "row-vs-group", "both"])
def test_converting_qat_model_with_other_config(make_decoder, tokens, qat, conv, words):
    model = make_decoder()
    quantize_(model, ParetoQQATConfig(bits=qat[0], group_size=qat[1]))
    with torch.no_grad():
        before = model(tokens)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"trained with ParetoQ QAT") as info:
        quantize_(model, ParetoQWeightOnlyConfig(bits=conv[0], group_size=conv[1]))
    msg = str(info.value)
    assert f"was trained with ParetoQ QAT {words[0]} but the config asks for {words[1]}" in msg, msg
    assert_unchanged(model, snap)
    with torch.no_grad():
        assert torch.equal(model(tokens), before)


# --------------------------------------------------------------------------------------------------
# QAT checkpoints of another format
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("saved,model_fmt", [
    ((2, None), (1.58, None)),
    ((1.58, None), (2, None)),
    ((2, 16), (2, None)),
    ((2, None), (2, 16)),
    ((3, 16), (3, 8)),
], ids=["2-vs-1.58", "1.58-vs-2", "g16-vs-row", "row-vs-g16", "g16-vs-g8"])
def test_loading_qat_checkpoint_of_other_format(make_decoder, saved, model_fmt):
    src = make_decoder(seed=1)
    quantize_(src, ParetoQQATConfig(bits=saved[0], group_size=saved[1]))
    dst = make_decoder(seed=2)
    quantize_(dst, ParetoQQATConfig(bits=model_fmt[0], group_size=model_fmt[1]))
    fmt = lambda b, g: f"bits={b}, group_size={g}"  # noqa: E731
    expected = (f"checkpoint layer 'blocks.0.proj' was saved with ParetoQ QAT {fmt(*saved)} "
                f"but the model has {fmt(*model_fmt)}")
    with pytest.raises(ValueError, match=re.escape(expected)):
        dst.load_state_dict(src.state_dict())
    for n in dst.block_linear_names():
        m = dst.get_submodule(n)
        assert (m.weight.bits, m.weight.group_size) == model_fmt
        assert m.weight_qat_format.tolist() == [round(100 * model_fmt[0]), model_fmt[1] or 0]


def test_loading_matching_qat_checkpoint_still_works(make_decoder, tokens):
    """Control for the test above: the same formats load, and the loaded values are used."""
    src = make_decoder(seed=1)
    quantize_(src, ParetoQQATConfig(bits=1.58, group_size=16))
    with torch.no_grad():
        src.blocks[0].proj.weight_scale.mul_(0.5)
    dst = make_decoder(seed=2)
    quantize_(dst, ParetoQQATConfig(bits=1.58, group_size=16))
    dst.load_state_dict(src.state_dict())
    with torch.no_grad():
        assert torch.equal(dst(tokens), src(tokens))
    assert dst.blocks[0].proj.weight.scale is dst.blocks[0].proj.weight_scale


@pytest.mark.parametrize("cfg", [ParetoQQATConfig(bits=2), ParetoQWeightOnlyConfig(bits=2)], ids=["qat", "convert"])
def test_selecting_a_head_tied_to_the_embedding(make_decoder, cfg):
    # An explicit filter that picks a head whose weight is the embedding's: converting it alone
    # would silently break the tie, so it is refused, naming both modules; nothing changes.
    model = make_decoder(tie=True)
    assert model.lm_head.weight is model.embed.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 'lm_head'.*tied to 'embed'"):
        quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    assert model.lm_head.weight is model.embed.weight
    assert all(type(m.weight) is nn.Parameter for m in model.modules() if isinstance(m, nn.Linear))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------------------------------
# A filter_fn selecting modules that are not nn.Linear: refused by name before any layer changes
# --------------------------------------------------------------------------------------------------


class _Custom(nn.Module):
    """A module with a 2-D float ``weight`` that is not an nn.Linear (its forward is not F.linear)."""

    def __init__(self, n=16):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n))

    def forward(self, x):
        return x @ self.weight


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(16, 16)
        self.conv = nn.Conv1d(16, 16, 1)
        self.custom = _Custom()
        self.last = nn.Linear(16, 16)


BITS = [2, 1.58]


def _one_line_refusal(info, cfg, fqn, type_name, qualified):
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{cfg.__name__} cannot be applied; no layer was changed: "), msg
    assert re.search(rf"layer '{re.escape(fqn)}' \({type_name}( with weight \([0-9, ]+\))?\): only nn\.Linear layers "
                     rf"can be quantized \(this is a {re.escape(qualified)}\)", msg), msg


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("fqn,type_name,qualified", [
    ("embed", "Embedding", "torch.nn.modules.sparse.Embedding"),
    ("norm", "LayerNorm", "torch.nn.modules.normalization.LayerNorm"),  # visited after every block Linear
    ("blocks.1.norm2", "LayerNorm", "torch.nn.modules.normalization.LayerNorm"),
], ids=["embedding", "final-norm", "block-norm"])
def test_filter_selecting_a_non_linear_module(make_decoder, tokens, cfg, bits, fqn, type_name, qualified):
    model = make_decoder()
    with torch.no_grad():
        before = model(tokens)
    snap = snapshot(model)
    with pytest.raises(ValueError) as info:
        quantize_(model, cfg(bits=bits), filter_fn=lambda m, name: isinstance(m, nn.Linear) or name == fqn)
    _one_line_refusal(info, cfg, fqn, type_name, qualified)
    assert_unchanged(model, snap)
    with torch.no_grad():
        assert torch.equal(model(tokens), before)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("fqn,type_name,qualified", [
    ("conv", "Conv1d", "torch.nn.modules.conv.Conv1d"),
    ("custom", "_Custom", f"{__name__}._Custom"),
], ids=["conv", "custom"])
def test_filter_selecting_conv_or_custom_module(cfg, bits, fqn, type_name, qualified):
    torch.manual_seed(0)
    model = _Mixed()
    snap = snapshot(model)
    with pytest.raises(ValueError) as info:
        quantize_(model, cfg(bits=bits), filter_fn=lambda m, name: isinstance(m, nn.Linear) or name == fqn)
    _one_line_refusal(info, cfg, fqn, type_name, qualified)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_filter_selecting_every_module_with_a_weight(make_decoder, cfg):
    # several refused modules: one line each, every one named; the Linears are not named
    model = make_decoder()
    snap = snapshot(model)
    with pytest.raises(ValueError) as info:
        quantize_(model, cfg(bits=2), filter_fn=lambda m, fqn: isinstance(getattr(m, "weight", None), torch.Tensor))
    lines = str(info.value).splitlines()
    assert lines[0] == f"{cfg.__name__} cannot be applied; no layer was changed:"
    named = [re.match(r"  layer '([^']+)' ", line).group(1) for line in lines[1:]]
    assert named == ["embed", "blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm"]
    assert all("only nn.Linear layers can be quantized" in line for line in lines[1:])
    assert_unchanged(model, snap)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_filter_selecting_a_container(make_decoder, cfg):
    model = make_decoder()
    snap = snapshot(model)
    with pytest.raises(ValueError) as info:
        quantize_(model, cfg(bits=2), filter_fn=lambda m, fqn: fqn == "blocks.0")
    _one_line_refusal(info, cfg, "blocks.0", "TinyBlock", "conftest.TinyBlock")
    assert_unchanged(model, snap)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_non_linear_and_bad_group_size_both_named(make_decoder, cfg):
    model = make_decoder()
    snap = snapshot(model)
    with pytest.raises(ValueError) as info:
        quantize_(model, cfg(bits=2, group_size=24),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Linear) or fqn == "embed")
    msg = str(info.value)
    assert "'embed' (Embedding with weight (64, 48)): only nn.Linear layers can be quantized" in msg, msg
    assert "'blocks.0.down' (Linear with weight (48, 80)): group_size=24 does not divide in_features=80" in msg, msg
    assert_unchanged(model, snap)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_default_filter_still_skips_non_linear_modules(make_decoder, tokens, cfg):
    model = make_decoder()
    quantize_(model, cfg(bits=2))
    assert type(model.embed.weight) is nn.Parameter and type(model.norm.weight) is nn.Parameter
    assert type(model.lm_head.weight) is nn.Parameter  # the output head stays in full precision
    kind = ParetoQQATWeight if cfg is ParetoQQATConfig else ParetoQPackedTensor
    assert all(isinstance(model.get_submodule(n).weight, kind) for n in model.block_linear_names())
    with torch.no_grad():
        assert torch.isfinite(model(tokens)).all()


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_a_linear_subclass_is_quantized(cfg):
    class MyLinear(nn.Linear):
        pass

    torch.manual_seed(0)
    model = nn.Sequential(MyLinear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    quantize_(model, cfg(bits=2), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    kind = ParetoQQATWeight if cfg is ParetoQQATConfig else ParetoQPackedTensor
    assert isinstance(model[0].weight, kind) and isinstance(model[2].weight, kind)


# --------------------------------------------------------------------------------------------------
# Meta-device models (built lazily): quantize_ gives meta placeholders of the right format, which
# load_state_dict(..., assign=True) of a checkpoint of that format fills
# --------------------------------------------------------------------------------------------------


def _meta_decoder(make_decoder, **kw):
    with torch.device("meta"):
        model = make_decoder(**kw)
    assert all(p.is_meta for p in model.parameters())
    return model


def _assert_nothing_meta(model):
    assert not [n for n, t in model.state_dict().items() if t.is_meta]
    for n, p in model.named_parameters():
        assert not p.is_meta, n
        if isinstance(p, ParetoQPackedTensor):
            assert not p.qdata.is_meta and not p.scale.is_meta, n


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("bits", [2, 1.58, 1, 3])
def test_meta_model_quantize_then_load_packed_safetensors(make_decoder, tokens, tmp_path, bits, group_size):
    from paretoq_ao import load_safetensors, save_safetensors

    cfg = ParetoQWeightOnlyConfig(bits=bits, group_size=group_size)
    ref = make_decoder(seed=3)
    quantize_(ref, cfg)
    path = tmp_path / "packed.safetensors"
    save_safetensors(ref, path)

    model = _meta_decoder(make_decoder)
    quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size))
    for n in model.block_linear_names():
        w = model.get_submodule(n).weight
        r = ref.get_submodule(n).weight
        assert isinstance(w, ParetoQPackedTensor) and w.is_meta and w.qdata.is_meta
        assert (w.bits, w.group_size, w.shape) == (r.bits, r.group_size, r.shape)
        assert (w.qdata.shape, w.qdata.dtype, w.scale.shape, w.scale.dtype) == \
            (r.qdata.shape, r.qdata.dtype, r.scale.shape, r.scale.dtype)
    assert type(model.lm_head.weight) is nn.Parameter  # default filter: head kept, as on a real model

    model.load_state_dict(load_safetensors(path), assign=True)
    _assert_nothing_meta(model)
    for n in model.block_linear_names():
        assert isinstance(model.get_submodule(n).weight, ParetoQPackedTensor)
    with torch.no_grad():
        assert torch.equal(model(tokens), ref(tokens))


@pytest.mark.parametrize("bits", BITS)
def test_meta_model_quantize_then_load_packed_state_dict(make_decoder, tokens, bits):
    ref = make_decoder(seed=4, dtype=torch.bfloat16)
    quantize_(ref, ParetoQWeightOnlyConfig(bits=bits, group_size=16, activations="int8"))
    model = _meta_decoder(make_decoder, dtype=torch.bfloat16)
    quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=16, activations="int8"))
    assert model.blocks[0].up.weight.scale.dtype == torch.bfloat16
    model.load_state_dict(ref.state_dict(), assign=True)
    _assert_nothing_meta(model)
    assert model.blocks[0].up.weight.activations == "int8"
    with torch.no_grad():
        assert torch.equal(model(tokens), ref(tokens))


@pytest.mark.parametrize("bits", BITS)
def test_meta_model_qat_then_load_qat_checkpoint(make_decoder, tokens, bits):
    cfg = lambda: ParetoQQATConfig(bits=bits, group_size=16)  # noqa: E731
    ref = make_decoder(seed=5)
    quantize_(ref, cfg())
    with torch.no_grad():
        ref.blocks[0].proj.weight_scale.mul_(0.7)  # a trained scale: not what init_scale gives
    model = _meta_decoder(make_decoder)
    quantize_(model, cfg())
    w = model.blocks[0].proj.weight
    assert isinstance(w, ParetoQQATWeight) and w.is_meta and w.scale is model.blocks[0].proj.weight_scale
    sd = ref.state_dict()
    keep = {k: v for k, v in sd.items()}
    model.load_state_dict(sd, assign=True)
    assert all(sd[k] is v for k, v in keep.items())  # the caller's dict is not rewritten
    _assert_nothing_meta(model)
    for n in model.block_linear_names():
        mod = model.get_submodule(n)
        assert isinstance(mod.weight, ParetoQQATWeight), n
        assert mod.weight.scale is mod.weight_scale, n
        assert (mod.weight.bits, mod.weight.group_size) == (bits, 16)
        assert mod.weight.requires_grad and mod.weight_scale.requires_grad
    assert sum(1 for _ in model.parameters()) == sum(1 for _ in ref.parameters())
    with torch.no_grad():
        assert torch.equal(model(tokens), ref(tokens))
    # it trains as the directly quantized model does: same gradients, scales included
    model.loss(tokens).backward()
    ref.loss(tokens).backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p.grad, q.grad), n
    # and converts to the same packed model
    quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=16))
    quantize_(ref, ParetoQWeightOnlyConfig(bits=bits, group_size=16))
    with torch.no_grad():
        assert torch.equal(model(tokens), ref(tokens))


@pytest.mark.parametrize("bits", BITS)
def test_meta_qat_model_converted_then_loaded(make_decoder, tokens, bits):
    ref = make_decoder(seed=6)
    quantize_(ref, ParetoQQATConfig(bits=bits))
    quantize_(ref, ParetoQWeightOnlyConfig(bits=bits))
    model = _meta_decoder(make_decoder)
    quantize_(model, ParetoQQATConfig(bits=bits))
    quantize_(model, ParetoQWeightOnlyConfig(bits=bits))
    assert not any(k.endswith(("weight_scale", "weight_qat_format")) for k in model.state_dict())
    model.load_state_dict(ref.state_dict(), assign=True)
    _assert_nothing_meta(model)
    with torch.no_grad():
        assert torch.equal(model(tokens), ref(tokens))


def test_assign_load_into_a_real_qat_model_keeps_it_qat(make_decoder, tokens):
    src = make_decoder(seed=1)
    quantize_(src, ParetoQQATConfig(bits=2))
    dst = make_decoder(seed=2)
    quantize_(dst, ParetoQQATConfig(bits=2))
    dst.load_state_dict(src.state_dict(), assign=True)
    for n in dst.block_linear_names():
        mod = dst.get_submodule(n)
        assert isinstance(mod.weight, ParetoQQATWeight) and mod.weight.scale is mod.weight_scale
    with torch.no_grad():
        assert torch.equal(dst(tokens), src(tokens))


def _meta_snapshot(model):
    return {
        "types": {n: type(p) for n, p in model.named_parameters()},
        "ids": {n: id(p) for n, p in model.named_parameters()},
        "sd": {k: (tuple(v.shape), v.device.type) for k, v in model.state_dict().items()},
    }


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_meta_model_refusals_name_the_layer(make_decoder, cfg, bits):
    model = _meta_decoder(make_decoder)
    snap = _meta_snapshot(model)
    with pytest.raises(ValueError, match=r"'blocks\.0\.down' \(Linear with weight \(48, 80\)\): group_size=24 does "
                                         r"not divide in_features=80"):
        quantize_(model, cfg(bits=bits, group_size=24))
    assert _meta_snapshot(model) == snap
    with pytest.raises(ValueError) as info:
        quantize_(model, cfg(bits=bits), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) or fqn == "norm")
    _one_line_refusal(info, cfg, "norm", "LayerNorm", "torch.nn.modules.normalization.LayerNorm")
    assert _meta_snapshot(model) == snap


def test_meta_packed_model_refuses_a_float_checkpoint(make_decoder):
    model = _meta_decoder(make_decoder)
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    with pytest.raises(ValueError, match=r"'blocks\.0\.proj(\.weight)?' holds a plain \(48, 48\).* weight but the "
                                         r"model's layer is packed"):
        model.load_state_dict(make_decoder().state_dict(), assign=True)


def test_meta_packed_model_refuses_a_checkpoint_of_another_format(make_decoder):
    ref = make_decoder()
    quantize_(ref, ParetoQWeightOnlyConfig(bits=1.58))
    model = _meta_decoder(make_decoder)
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    with pytest.raises(ValueError, match=r"'blocks\.0\.proj(\.weight)?'.*bits=1\.58.*bits=2"):
        model.load_state_dict(ref.state_dict(), assign=True)


def test_meta_qat_model_refuses_a_checkpoint_of_another_format(make_decoder):
    ref = make_decoder()
    quantize_(ref, ParetoQQATConfig(bits=1.58))
    model = _meta_decoder(make_decoder)
    quantize_(model, ParetoQQATConfig(bits=2))
    expected = ("checkpoint layer 'blocks.0.proj' was saved with ParetoQ QAT bits=1.58, group_size=None but the "
                "model has bits=2, group_size=None")
    with pytest.raises(ValueError, match=re.escape(expected)):
        model.load_state_dict(ref.state_dict(), assign=True)


def test_meta_qat_model_refuses_a_float_checkpoint(make_decoder):
    model = _meta_decoder(make_decoder)
    quantize_(model, ParetoQQATConfig(bits=2))
    with pytest.raises(ValueError, match=r"'blocks\.0\.proj' has a weight but no weight_scale, and the model's is on "
                                         r"the meta device: a float checkpoint is loaded before ParetoQQATConfig"):
        model.load_state_dict(make_decoder().state_dict(), assign=True, strict=False)


def test_meta_qat_model_after_to_empty_is_refused_clearly(make_decoder):
    ref = make_decoder()
    quantize_(ref, ParetoQQATConfig(bits=2))
    model = _meta_decoder(make_decoder)
    quantize_(model, ParetoQQATConfig(bits=2))
    model.to_empty(device="cpu")  # nn.Module replaces the meta QAT weight by a plain Parameter
    with pytest.raises(ValueError, match=r"'blocks\.0\.proj'.*plain Parameter weight.*Module\.to_empty\(\).*"
                                         r"assign=True"):
        model.load_state_dict(ref.state_dict())
