"""Loading checks and dtype conversions of packed weights.

* ``load_safetensors`` checks every packed tensor of a file against its metadata (format, shape,
  qdata dtype/shape, scale dtype/shape) and names the file and the key; truncated or garbage files
  and tampered metadata give one-line ``SafetensorsFileError`` s (OSError and ValueError);
* ``load_state_dict`` into a converted model checks each packed weight against the layer (format,
  shape, damaged parts, scale dtype) before the layer changes, naming the key;
* a full disk during ``save`` / ``save_safetensors`` is an OSError with errno ENOSPC naming the file,
  and the previous file survives;
* ``module.to(dtype)`` / ``.half()`` / ``.bfloat16()`` / ``.double()`` / ``.float()`` convert the
  scales of packed weights (codes unchanged), and the model computes in that dtype like a plain
  PyTorch dequantize + F.linear.
"""

from __future__ import annotations

import errno
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torchao import quantize_

import paretoq_ao
from paretoq_ao import ParetoQPackedTensor, ParetoQWeightOnlyConfig, set_activations
from paretoq_ao.backends import BackendFallbackWarning
from paretoq_ao.formats import SCALE_EPS, get_format
from paretoq_ao.packed import check_packed_state_dict
from paretoq_ao.packing import packed_row_bytes, unpack_codes
from paretoq_ao.serialization import SafetensorsFileError

pytestmark = pytest.mark.usefixtures("single_thread")

ALL_BITS = [1, 1.58, 2, 3, 4]
BITS_X_GRAN = [(b, g) for b in ALL_BITS for g in (None, 16)]
IDS = [f"{b}-{'row' if g is None else f'g{g}'}" for b, g in BITS_X_GRAN]
N, K = 40, 48
KEY = "0.weight"


def _model(bits, group_size, seed=0, n_layers=1):
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(K, K if i < n_layers - 1 else N) for i in range(n_layers)])
    quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size))
    return model


def _snapshot(model):
    return {k: (v.qdata.clone(), v.scale.clone(), v.dtype) if isinstance(v, ParetoQPackedTensor) else v.clone()
            for k, v in model.state_dict().items()}


def _assert_unchanged(model, snap):
    now = model.state_dict()
    assert now.keys() == snap.keys()
    for k, before in snap.items():
        v = now[k]
        if isinstance(v, ParetoQPackedTensor):
            assert (torch.equal(v.qdata, before[0]) and torch.equal(v.scale, before[1])
                    and v.dtype == before[2]), k
        else:
            assert torch.equal(v, before), k


def _one_line_naming(exc, *words):
    msg = str(exc)
    assert "\n" not in msg, msg
    for w in words:
        assert str(w) in msg, (w, msg)
    return msg


# --------------------------------------------------------------------------------------------------
# load_safetensors: tampered files
# --------------------------------------------------------------------------------------------------


def _saved(tmp_path, bits, group_size):
    path = tmp_path / "m.safetensors"
    paretoq_ao.save_safetensors(_model(bits, group_size), path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    return path, tensors, meta


def _rewrite(path, tensors, meta):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def _expect_bad_file(path, *words):
    with pytest.raises(SafetensorsFileError) as info:
        paretoq_ao.load_safetensors(path)
    assert isinstance(info.value, OSError) and isinstance(info.value, ValueError)
    return _one_line_naming(info.value, path, *words)


def _other_row_bytes(bits):
    return packed_row_bytes(K, bits) - 1


@pytest.mark.parametrize("bits,group_size", BITS_X_GRAN, ids=IDS)
def test_untampered_file_loads(tmp_path, bits, group_size):
    path, _, _ = _saved(tmp_path, bits, group_size)
    sd = paretoq_ao.load_safetensors(path)
    w = sd[KEY]
    assert isinstance(w, ParetoQPackedTensor) and (w.bits, w.group_size, tuple(w.shape)) == (bits, group_size, (N, K))


@pytest.mark.parametrize("bits,group_size", BITS_X_GRAN, ids=IDS)
@pytest.mark.parametrize("tamper", ["qdata-cols", "qdata-rows", "qdata-dtype", "scale-rows", "scale-groups",
                                    "scale-dtype", "scale-1d"])
def test_tampered_packed_tensor_is_refused_naming_the_key(tmp_path, bits, group_size, tamper):
    path, tensors, meta = _saved(tmp_path, bits, group_size)
    q, s = tensors[f"{KEY}.qdata"], tensors[f"{KEY}.scale"]
    if tamper == "qdata-cols":
        tensors[f"{KEY}.qdata"], word = q[:, :_other_row_bytes(bits)], "qdata has shape"
    elif tamper == "qdata-rows":
        tensors[f"{KEY}.qdata"], word = q[:1], "qdata has shape"
    elif tamper == "qdata-dtype":
        tensors[f"{KEY}.qdata"], word = q.to(torch.int16), "int16"
    elif tamper == "scale-rows":
        tensors[f"{KEY}.scale"], word = s[:1], "scale has shape"
    elif tamper == "scale-groups":  # 5 groups do not divide K = 48
        tensors[f"{KEY}.scale"], word = s[:, :1].repeat(1, 5), "scale has shape"
    elif tamper == "scale-dtype":
        tensors[f"{KEY}.scale"], word = (s * 1000).to(torch.int32), "int32"
    else:
        tensors[f"{KEY}.scale"], word = s[:, 0], "scale has shape"
    _rewrite(path, tensors, meta)
    _expect_bad_file(path, repr(KEY), word)


def _with_meta(tmp_path, edit, bits=2, group_size=None):
    path, tensors, meta = _saved(tmp_path, bits, group_size)
    info = json.loads(meta["paretoq_ao"])
    out = edit(info, tensors)
    meta["paretoq_ao"] = out if isinstance(out, str) else json.dumps(info)
    _rewrite(path, tensors, meta)
    return path


def _edit(fn):
    """An edit of (metadata info, tensors) that returns None (the info is re-encoded)."""
    def edit(info, tensors):
        fn(info, tensors)
    return edit


def _set_entry(key, value):
    def edit(info, tensors):
        info["tensors"][KEY][key] = value
    return edit


def _del_entry(key):
    def edit(info, tensors):
        del info["tensors"][KEY][key]
    return edit


META_CASES = {
    "not-json": (lambda info, t: '{"layout": "paretoq-rowbits-v1", "tensors": {', ["not valid JSON"]),
    "not-object": (lambda info, t: "[1, 2]", ["'layout' and 'tensors'"]),
    "no-tensors": (_edit(lambda info, t: info.pop("tensors")), ["'layout' and 'tensors'"]),
    "no-layout": (_edit(lambda info, t: info.pop("layout")), ["'layout' and 'tensors'"]),
    "other-layout": (_edit(lambda info, t: info.update(layout="rowbits-v0")), ["rowbits-v0"]),
    "no-bits": (_del_entry("bits"), [repr(KEY), "'bits'"]),
    "no-shape": (_del_entry("shape"), [repr(KEY), "'shape'"]),
    "bits-2.5": (_set_entry("bits", 2.5), [repr(KEY), "bits=2.5"]),
    "bits-str": (_set_entry("bits", "two"), [repr(KEY), "bits='two'"]),
    "shape-3d": (_set_entry("shape", [N, K, 1]), [repr(KEY), "not [out_features, in_features]"]),
    "shape-str": (_set_entry("shape", "40x48"), [repr(KEY), "not [out_features, in_features]"]),
    "shape-other-k": (_set_entry("shape", [N, K + 16]), [repr(KEY), "qdata has shape"]),
    "bits-other": (_set_entry("bits", 4), [repr(KEY), "qdata has shape"]),  # 2-bit codes read as 4-bit
    "activations": (_set_entry("activations", "int4"), [repr(KEY), "'int4'"]),
    "entry-no-tensors": (_edit(lambda info, t: info["tensors"].update({"1.weight": {"bits": 2, "shape": [N, K]}})),
                         ["'1.weight'", "'1.weight.qdata'", "'1.weight.scale'"]),
    "missing-scale": (_edit(lambda info, t: t.pop(f"{KEY}.scale")), [repr(KEY), f"'{KEY}.scale'"]),
    "also-plain": (_edit(lambda info, t: t.update({KEY: torch.zeros(N, K)})), [repr(KEY), "plain tensor"]),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_tampered_metadata_is_refused_clearly(tmp_path, case):
    edit, words = META_CASES[case]
    path = _with_meta(tmp_path, edit)
    _expect_bad_file(path, *words)


def test_file_of_plain_tensors_still_loads(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"a": torch.arange(4)}, str(path))
    assert torch.equal(paretoq_ao.load_safetensors(path)["a"], torch.arange(4))


@pytest.mark.parametrize("damage", ["truncated", "header-only", "empty", "garbage", "text"])
def test_truncated_or_garbage_file_names_the_file(tmp_path, damage):
    path, _, _ = _saved(tmp_path, 3, 16)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) - 37], "header-only": data[:40], "empty": b"",
                      "garbage": bytes(range(256)) * 8, "text": b"version https://git-lfs.github.com/spec/v1\n"}[damage])
    msg = _expect_bad_file(path, "safetensors")
    assert "Error while deserializing" in msg  # the reader's reason is kept


def test_missing_file_and_directory_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        paretoq_ao.load_safetensors(tmp_path / "nope.safetensors")
    assert info.value.errno == errno.ENOENT and info.value.filename == str(tmp_path / "nope.safetensors")
    with pytest.raises(IsADirectoryError) as info:
        paretoq_ao.load_safetensors(tmp_path)
    assert info.value.filename == str(tmp_path)


# --------------------------------------------------------------------------------------------------
# load_state_dict into a converted model
# --------------------------------------------------------------------------------------------------


def _packed_like(w, qdata=None, scale=None, bits=None, shape=None):
    return ParetoQPackedTensor(w.qdata.clone() if qdata is None else qdata, w.scale.clone() if scale is None else scale,
                               w.bits if bits is None else bits, w.shape if shape is None else shape)


def _bad_state_dicts(bits, group_size):
    src = _model(bits, group_size, seed=7)
    w, b = src[0].weight, src[0].bias.detach()
    other_bits = ALL_BITS[(ALL_BITS.index(bits) + 1) % len(ALL_BITS)]
    other = _model(other_bits, group_size, seed=7)[0].weight
    other_gran = _model(bits, 16 if group_size is None else None, seed=7)[0].weight
    fmt = f"bits={bits}, group_size={group_size}"
    return {
        "qdata-cols": (_packed_like(w, qdata=w.qdata[:, :1].contiguous()), ["qdata has shape"]),
        "qdata-dtype": (_packed_like(w, qdata=w.qdata.to(torch.int32)), ["int32"]),
        "scale-rows": (_packed_like(w, scale=w.scale[:1].contiguous()), ["scale has shape"]),
        "scale-dtype": (_packed_like(w, scale=w.scale.to(torch.bfloat16)), ["bfloat16", "float32"]),
        "scale-float64": (_packed_like(w, scale=w.scale.double()), ["float64", "float32"]),
        "scale-int": (_packed_like(w, scale=w.scale.to(torch.int64)), ["int64"]),
        "other-bits": (other, [f"bits={other_bits}", fmt]),
        "row-vs-group": (other_gran, [f"group_size={16 if group_size is None else None}", fmt]),
        "plain-same-shape": (torch.randn(N, K), ["plain (40, 48) float32 weight"]),
        "plain-bf16": (torch.randn(N, K, dtype=torch.bfloat16), ["plain (40, 48) bfloat16 weight"]),
        "plain-other-shape": (torch.randn(N, K + 1), ["plain (40, 49)"]),
    }, b


CASES = list(_bad_state_dicts(2, None)[0])


@pytest.mark.parametrize("bits,group_size", BITS_X_GRAN, ids=IDS)
def test_load_state_dict_refuses_mismatches_naming_the_key(bits, group_size):
    cases, bias = _bad_state_dicts(bits, group_size)
    dst = _model(bits, group_size)
    snap = _snapshot(dst)
    for case, (weight, words) in cases.items():
        with pytest.raises(ValueError) as info:
            dst.load_state_dict({KEY: weight, "0.bias": bias + 1})
        _one_line_naming(info.value, repr(KEY), *words)
        _assert_unchanged(dst, snap)  # bias included: the layer's check runs before it loads
    # a matching state dict loads, values included
    src = _model(bits, group_size, seed=7)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst[0].weight.qdata, src[0].weight.qdata) and torch.equal(dst[0].weight.scale, src[0].weight.scale)


@pytest.mark.parametrize("bits,group_size", [(1.58, None), (3, 16)], ids=["1.58-row", "3-g16"])
def test_copy_checks_without_the_load_hook(bits, group_size):
    """A packed weight that did not get the load hook (built by other code): copy_ itself refuses,
    before changing either part; load_state_dict names the parameter."""
    cases, bias = _bad_state_dicts(bits, group_size)
    dst = _model(bits, group_size)
    dst[0]._paretoq_load_hook.remove()
    snap = _snapshot(dst)
    for case, (weight, words) in cases.items():
        if case == "plain-other-shape":
            continue  # torch's own size check
        with pytest.raises(RuntimeError) as info:
            dst.load_state_dict({KEY: weight, "0.bias": bias})
        msg = str(info.value)
        assert f'"{KEY}"' in msg and "cannot copy into a packed ParetoQ weight" in msg, msg
        for w in words:
            assert w in msg, (w, msg)
        assert torch.equal(dst[0].weight.qdata, snap[KEY][0]) and torch.equal(dst[0].weight.scale, snap[KEY][1])
    with pytest.raises(ValueError, match="scale has shape"):
        dst[0].weight.copy_(cases["scale-rows"][0])
    assert torch.equal(dst[0].weight.qdata, snap[KEY][0]) and torch.equal(dst[0].weight.scale, snap[KEY][1])


def test_assign_keeps_the_checkpoint_dtype_but_checks_the_rest():
    src = _model(2, 16, seed=3).to(torch.bfloat16)
    dst = _model(2, 16)
    dst.load_state_dict(src.state_dict(), assign=True)
    assert dst[0].weight.dtype == torch.bfloat16 and torch.equal(dst[0].weight.scale, src[0].weight.scale)
    dst = _model(2, 16)
    w = src[0].weight
    with pytest.raises(ValueError, match="qdata has shape"):
        dst.load_state_dict({KEY: _packed_like(w, qdata=w.qdata[:, :3].contiguous()), "0.bias": src[0].bias},
                            assign=True)


def test_flattened_parts_name_the_right_loader(tmp_path):
    path, _, _ = _saved(tmp_path, 2, None)
    from safetensors.torch import load_file

    dst = _model(2, None)
    with pytest.raises(ValueError) as info:
        dst.load_state_dict(load_file(str(path)))
    _one_line_naming(info.value, repr(KEY), f"'{KEY}.qdata'", "paretoq_ao.load_safetensors")


def test_check_packed_state_dict_is_all_or_nothing():
    src = _model(4, 16, seed=5, n_layers=2)
    dst = _model(4, 16, n_layers=2)
    snap = _snapshot(dst)
    sd = dict(src.state_dict())
    w = sd["1.weight"]
    sd["1.weight"] = _packed_like(w, scale=w.scale[:, :1].repeat(1, 5))
    with pytest.raises(ValueError) as info:
        check_packed_state_dict(dst, sd)
    _one_line_naming(info.value, "'1.weight'", "scale has shape")
    _assert_unchanged(dst, snap)
    sd["1.weight"] = w
    check_packed_state_dict(dst, sd)
    # a packed checkpoint for a model that is not converted
    plain = nn.Sequential(nn.Linear(K, K), nn.Linear(K, N))
    with pytest.raises(ValueError, match=r"'0.weight' holds a packed weight .*not converted"):
        check_packed_state_dict(plain, sd)


# --------------------------------------------------------------------------------------------------
# Failed saves: full disk
# --------------------------------------------------------------------------------------------------


def _previous(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        paretoq_ao.save_safetensors(_model(2, None), path)
    else:
        paretoq_ao.save({"w": torch.arange(6)}, path)
    return path, path.read_bytes()


def _assert_full_disk_error(info, path, before, tmp_path):
    e = info.value
    assert type(e) is OSError and e.errno == errno.ENOSPC, repr(e)
    _one_line_naming(e, path, "No space left on device")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("how", ["safetensor-error", "oserror"])
def test_save_safetensors_full_disk(tmp_path, monkeypatch, how):
    import safetensors.torch

    path, before = _previous(tmp_path, "model.safetensors")

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 4096)  # a partial file, as a real full disk leaves
        if how == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError) as info:
        paretoq_ao.save_safetensors(_model(3, 16), path)
    _assert_full_disk_error(info, path, before, tmp_path)


def test_torch_save_full_disk(tmp_path, monkeypatch):
    """torch.save on a full disk says only "unexpected pos": a short write in a folder with (next to)
    no space left is ENOSPC, any other short write EIO; both name the file."""
    from paretoq_ao import serialization

    path, before = _previous(tmp_path, "ckpt.pt")

    def short_write(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\3\4partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(OSError) as info:
        paretoq_ao.save({"w": torch.arange(9)}, path)
    e = info.value
    assert e.errno == errno.EIO and str(path) in str(e) and "unexpected pos" in str(e) and "\n" not in str(e)
    assert path.read_bytes() == before

    real_usage = serialization.shutil.disk_usage
    monkeypatch.setattr(serialization.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=4096))
    with pytest.raises(OSError) as info:
        paretoq_ao.save({"w": torch.arange(9)}, path)
    _assert_full_disk_error(info, path, before, tmp_path)


@pytest.mark.parametrize("where", ["fsync", "chmod"])
def test_full_disk_after_the_write_names_the_file(tmp_path, monkeypatch, where):
    """Errors of atomic_write's own steps name the destination, not the temporary file."""
    path, before = _previous(tmp_path, "model.safetensors")

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    def chmod(p, mode):
        raise OSError(errno.ENOSPC, "No space left on device", p)  # names the temporary file

    monkeypatch.setattr(os, where, fsync if where == "fsync" else chmod)
    with pytest.raises(OSError) as info:
        paretoq_ao.save_safetensors({"w": torch.ones(3)}, path)
    _assert_full_disk_error(info, path, before, tmp_path)


def test_non_io_save_errors_pass_through(tmp_path):
    with pytest.raises(TypeError, match="'bad' is a int"):
        paretoq_ao.save_safetensors({"bad": 3}, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Module dtype conversions
# --------------------------------------------------------------------------------------------------


def _oracle_weight(w, dtype):
    """Plain PyTorch: unpack the codes, dequantize in ``dtype`` with the formats table."""
    fmt = get_format(w.bits)
    codes = unpack_codes(w.qdata, w.shape[1], w.bits).to(dtype)
    s = w.scale.clamp_min(SCALE_EPS).to(dtype).repeat_interleave(w.shape[1] // w.scale.shape[1], dim=1)
    return (codes - fmt.zero) * fmt.step * s


def _oracle(x, w, bias, dtype):
    """dequantize + F.linear, both in ``dtype``."""
    return F.linear(x, _oracle_weight(w, dtype), bias)


CONVERSIONS = {
    "to-bf16": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "bfloat16": (lambda m: m.bfloat16(), torch.bfloat16),
    "half": (lambda m: m.half(), torch.float16),
    "to-cpu-fp16": (lambda m: m.to("cpu", torch.float16), torch.float16),
    "double": (lambda m: m.double(), torch.float64),
    "to-dtype-kw": (lambda m: m.to(dtype=torch.float64), torch.float64),
}
# max |error| / max |oracle| (the C++ kernels take low-precision tensors but compute in float32)
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.mark.filterwarnings("ignore::paretoq_ao.backends.BackendFallbackWarning")
@pytest.mark.parametrize("bits,group_size", BITS_X_GRAN, ids=IDS)
@pytest.mark.parametrize("conversion", list(CONVERSIONS))
def test_module_dtype_conversion_converts_the_scales(bits, group_size, conversion):
    convert, dtype = CONVERSIONS[conversion]
    model = _model(bits, group_size)
    w = model[0].weight
    qdata, scale = w.qdata.clone(), w.scale.clone()
    assert convert(model) is model
    w = model[0].weight
    assert isinstance(w, ParetoQPackedTensor) and type(model[0].weight) is ParetoQPackedTensor
    assert w.dtype == dtype and w.scale.dtype == dtype and model[0].bias.dtype == dtype
    assert w.qdata.dtype == torch.uint8 and torch.equal(w.qdata, qdata)  # the codes stay
    assert torch.equal(w.scale, scale.to(dtype)) and (w.bits, w.group_size, tuple(w.shape)) == (bits, group_size, (N, K))
    assert {p.dtype for p in model.parameters()} == {dtype}
    x = torch.randn(5, K).to(dtype)
    with torch.no_grad():
        got = model(x)
    ref = _oracle(x, w, model[0].bias.detach(), dtype)
    assert got.dtype == dtype and got.shape == ref.shape
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= TOLERANCE[dtype] * ref.double().abs().max().item(), err
    torch.testing.assert_close(w.dequantize(), _oracle_weight(w, dtype), rtol=0, atol=0)


@pytest.mark.parametrize("bits,group_size", [(1, None), (1.58, 16), (4, 16)], ids=["1-row", "1.58-g16", "4-g16"])
def test_round_trip_and_device_moves(bits, group_size):
    model = _model(bits, group_size)
    qdata, scale = model[0].weight.qdata.clone(), model[0].weight.scale.clone()
    model.bfloat16().float()
    w = model[0].weight
    assert w.dtype == torch.float32 and torch.equal(w.qdata, qdata)
    assert torch.equal(w.scale, scale.to(torch.bfloat16).float())
    x = torch.randn(3, K)
    with torch.no_grad():
        before = model(x)
    model.to("cpu")
    model.to(torch.device("cpu"), torch.float32)
    model.float()
    assert model[0].weight.dtype == torch.float32 and torch.equal(model[0].weight.qdata, qdata)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_tensor_to_copies_and_refuses_non_float_dtypes():
    w = _model(3, 16)[0].weight
    v = w.to(torch.bfloat16)
    assert type(v) is ParetoQPackedTensor and v.dtype == torch.bfloat16 and w.dtype == torch.float32
    assert v.qdata.data_ptr() != w.qdata.data_ptr()  # a copy: copy_ into one never changes the other
    assert w.to(torch.float32) is w
    for bad in (torch.int32, torch.float8_e4m3fn, torch.complex64):
        with pytest.raises(TypeError) as info:
            w.to(bad)
        _one_line_naming(info.value, "bits=3", "group_size=16", str(bad), "float32, bfloat16, float16, float64")
    assert w.dtype == torch.float32


def test_conversion_keeps_shared_weights_and_activations():
    torch.manual_seed(0)
    shared = nn.Linear(K, K)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    quantize_(model, ParetoQWeightOnlyConfig(bits=2, group_size=16, activations="int8"),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    assert model[0].weight is model[2].weight
    model.half()
    assert model[0].weight is model[2].weight and model[0].weight.dtype == torch.float16
    assert model[0].weight.activations == "int8"
    set_activations(model, "float")
    x = torch.randn(2, K, dtype=torch.float16)
    with torch.no_grad():
        got = model(x)
    w = model[0].weight
    h = F.relu(_oracle(x, w, model[0].bias, torch.float16))
    ref = _oracle(h, w, model[0].bias, torch.float16)
    assert (got.float() - ref.float()).abs().max() <= 3e-3 * ref.float().abs().max()


def test_converted_model_saves_and_loads_in_its_dtype(tmp_path):
    model = _model(1.58, 16).bfloat16()
    path = tmp_path / "bf16.safetensors"
    paretoq_ao.save_safetensors(model, path)
    sd = paretoq_ao.load_safetensors(path)
    assert sd[KEY].dtype == torch.bfloat16
    fresh = _model(1.58, 16, seed=9)
    snap = _snapshot(fresh)
    with pytest.raises(ValueError) as info:
        fresh.load_state_dict(sd)
    _one_line_naming(info.value, repr(KEY), "bfloat16 scales", "float32 scales", ".to(torch.bfloat16)")
    _assert_unchanged(fresh, snap)
    fresh.bfloat16().load_state_dict(sd)
    x = torch.randn(3, K, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_compile_and_export_of_a_bf16_model():
    torch._dynamo.reset()
    try:
        model = _model(2, 16).bfloat16()
        assert model[0].weight.scale.dtype == torch.bfloat16
        x = torch.randn(4, K, dtype=torch.bfloat16)
        with torch.no_grad():
            eager = model(x)
            got = torch.compile(model, fullgraph=True)(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, eager, rtol=0, atol=0)
        ep = torch.export.export(model, (x,))
        assert any(n.target is torch.ops.paretoq.linear.default for n in ep.graph.nodes)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), eager, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


def test_float64_runs_the_reference():
    model = _model(3, None).double()
    x = torch.randn(2, K, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackendFallbackWarning)
        with torch.no_grad():
            got = model(x)
    w = model[0].weight
    torch.testing.assert_close(got, _oracle(x, w, model[0].bias, torch.float64), rtol=1e-12, atol=1e-12)
