"""Ternary weights at 1.6 bits per weight (the trits5 layout of packing.py) through every path:
pack/unpack against a pure-Python oracle (every trit pattern, every row-tail length, odd K), the
sizes, the C++ kernels (every path on this CPU, both activation modes) against the PyTorch
reference, the same codes in the old 2-bit-field layout giving identical outputs once loaded, old
checkpoints (safetensors, torch.save, Hugging Face folders) loading, the .pte, and bad input."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchao import quantize_

import paretoq_ao as pq
from paretoq_ao import packing
from paretoq_ao.ops import reference_linear, reference_linear_8da
from paretoq_ao.serialization import SafetensorsFileError, load_safetensors, save_safetensors

from test_packing import ref_pack, ref_pack_trits5, ref_unpack_trits5


def _codes(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n, k), generator=g, dtype=torch.int64).to(torch.uint8)


def _ternary_linear(k, n, group_size=None, seed=0, acts="float"):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=False)
    quantize_(lin, pq.ParetoQWeightOnlyConfig(bits=1.58, group_size=group_size, activations=acts),
              filter_fn=lambda m, f: True)
    return lin


# --------------------------------------------------------------------------------------------
# pack / unpack


def test_every_trit_pattern_of_a_byte():
    patterns = torch.tensor(list(itertools.product(range(3), repeat=5)), dtype=torch.uint8)  # 243 x 5
    packed = pq.pack_codes(patterns, 1.58)
    assert packed.shape == (243, 1)
    assert torch.equal(packed, ref_pack_trits5(patterns.tolist()))
    assert sorted(set(packed.flatten().tolist())) == sorted(set(range(256)) - set(packing.TRITS5_INVALID_BYTES))
    assert len(packing.TRITS5_INVALID_BYTES) == 13
    assert torch.equal(pq.unpack_codes(packed, 5, 1.58), patterns)


@pytest.mark.parametrize("k", list(range(1, 61)) + [99, 101, 1003, 4099])
def test_round_trip_every_row_tail(k):
    codes = _codes(3, k, seed=k)
    packed = pq.pack_codes(codes, 1.58)
    assert packed.shape == (3, (k + 4) // 5)
    assert torch.equal(packed, ref_pack_trits5(codes.tolist()))
    assert torch.equal(pq.unpack_codes(packed, k, 1.58), codes)
    assert ref_unpack_trits5(packed, k) == codes.tolist()


def test_trits_past_the_row_end_are_zero():
    for k in range(1, 41):
        packed = pq.pack_codes(torch.full((1, k), 2, dtype=torch.uint8), 1.58)
        # every byte holds five trits; the ones no column maps to must be 0 (k columns of code 2)
        v = [b * 243 // 256 for b in packed[0].tolist()]
        trits = sum(sum(1 for i in range(5) if x // 3 ** i % 3) for x in v)
        assert trits == k, (k, v)


@pytest.mark.parametrize("k,group_size", [(640, None), (640, 64), (4096, 128), (11008, 64), (2048, 32)])
def test_size_is_at_most_1_61_bits_per_weight_plus_scales(k, group_size):
    lin = _ternary_linear(k, 16, group_size)
    w = lin.weight
    assert w.qdata.numel() * 8 / (16 * k) <= 1.61
    rep = pq.model_size(lin)
    scale_bits = w.scale.numel() * w.scale.element_size() * 8 / (16 * k)
    assert rep.layers[0].bits_per_weight == pytest.approx(w.qdata.numel() * 8 / (16 * k) + scale_bits)
    two = nn.Linear(k, 16, bias=False)
    quantize_(two, pq.ParetoQWeightOnlyConfig(bits=2, group_size=group_size), filter_fn=lambda m, f: True)
    assert two.weight.qdata.numel() - w.qdata.numel() == 16 * (k // 4 - (k + 4) // 5)


# --------------------------------------------------------------------------------------------
# old layout (paretoq-rowbits-v1: ternary in 2-bit fields)


def _legacy(codes):
    return ref_pack(codes.tolist(), 2)


@pytest.mark.parametrize("k", [1, 4, 5, 13, 64, 130])
def test_from_legacy_repacks_the_same_codes(k):
    codes = _codes(4, k, seed=k)
    assert torch.equal(packing.from_legacy(_legacy(codes), k, 1.58), pq.pack_codes(codes, 1.58))
    two = _legacy(_codes(4, k, seed=k) % 2)
    assert packing.from_legacy(two, k, 2) is two  # the other formats did not change layout
    bad = _legacy(codes)
    bad[0, 0] |= 3  # code 3: no ternary code
    with pytest.raises(ValueError, match="code 3"):
        packing.from_legacy(bad, k, 1.58)


def _legacy_safetensors(path, lin):
    """A file as the previous version wrote it: layout paretoq-rowbits-v1, 2-bit ternary fields."""
    from safetensors.torch import save_file
    w = lin.weight
    meta = {"format": "pt", "paretoq_ao": json.dumps({"layout": "paretoq-rowbits-v1", "tensors": {
        "weight": {"bits": 1.58, "shape": list(w.shape)}}})}
    save_file({"weight.qdata": _legacy(w.codes()), "weight.scale": w.scale.contiguous()}, str(path), metadata=meta)


@pytest.mark.parametrize("group_size", [None, 32])
def test_old_safetensors_file_loads_and_gives_identical_outputs(group_size, tmp_path):
    lin = _ternary_linear(96, 7, group_size)
    _legacy_safetensors(tmp_path / "old.safetensors", lin)
    sd = load_safetensors(tmp_path / "old.safetensors")
    assert torch.equal(sd["weight"].qdata, lin.weight.qdata)
    x = torch.randn(3, 96)
    fresh = nn.Linear(96, 7, bias=False)
    quantize_(fresh, pq.ParetoQWeightOnlyConfig(bits=1.58, group_size=group_size), filter_fn=lambda m, f: True)
    fresh.load_state_dict(sd)
    for acts in ("float", "int8"):
        pq.set_activations(lin, acts)
        pq.set_activations(fresh, acts)
        assert torch.equal(fresh(x), lin(x))
    save_safetensors(fresh, tmp_path / "new.safetensors")  # written in the current layout
    from safetensors import safe_open
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["paretoq_ao"])["layout"] == pq.LAYOUT
        assert f.get_tensor("weight.qdata").shape == (7, (96 + 4) // 5)


def test_old_torch_save_pickle_loads(tmp_path):
    lin = _ternary_linear(45, 3)
    old = pq.ParetoQPackedTensor(_legacy(lin.weight.codes()), lin.weight.scale, 1.58, lin.weight.shape)
    del old.packing_layout  # as pickled before the trits5 layout existed
    buf = io.BytesIO()
    torch.save({"w": old}, buf)
    buf.seek(0)
    got = torch.load(buf)["w"]
    assert torch.equal(got.qdata, lin.weight.qdata)
    x = torch.randn(2, 45)
    assert torch.equal(F.linear(x, got), lin(x))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_old_hugging_face_folder_loads_with_the_same_logits(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    import paretoq_ao.hf as hf

    model = _tiny_llama()
    quantize_(model, pq.ParetoQWeightOnlyConfig(bits=1.58, group_size=None),
              filter_fn=lambda m, f: isinstance(m, nn.Linear) and "lm_head" not in f)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        want = model(ids).logits
    hf.save_quantized(model, None, tmp_path / "new")
    # rewrite it as the previous version wrote it: layout paretoq-rowbits-v1, 2-bit ternary fields
    old = tmp_path / "old"
    os.makedirs(old)
    cfg = json.loads((tmp_path / "new" / "config.json").read_text())
    assert cfg["quantization_config"]["layout"] == pq.LAYOUT
    cfg["quantization_config"]["layout"] = "paretoq-rowbits-v1"
    (old / "config.json").write_text(json.dumps(cfg))
    with safe_open(str(tmp_path / "new" / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        flat = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["paretoq_ao"])
    for name, d in info["tensors"].items():
        flat[f"{name}.qdata"] = _legacy(pq.unpack_codes(flat[f"{name}.qdata"], d["shape"][1], 1.58))
    info["layout"] = "paretoq-rowbits-v1"
    meta["paretoq_ao"] = json.dumps(info)
    save_file(flat, str(old / "model.safetensors"), metadata=meta)
    for loaded in (AutoModelForCausalLM.from_pretrained(str(old)), hf.load_model(str(old), tokenizer=False)[0]):
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want)


# --------------------------------------------------------------------------------------------
# the kernels: every CPU path, both activation modes, old vs new layout


_PATHS_SCRIPT = """
import json, sys, torch, torch.nn as nn
from torchao import quantize_
import paretoq_ao as pq
from paretoq_ao import packing
from paretoq_ao.export import cpu_backend
from paretoq_ao.ops import reference_linear, reference_linear_8da
from test_packing import ref_pack
out = {"path": cpu_backend.plan(torch.randn(1, 640), torch.zeros(3, 128, dtype=torch.uint8),
                               torch.ones(3, 1), 1.58)}
worst = 0.0
for k, gs in ((640, None), (640, 64), (1000, 40), (4100, None), (88, 8), (72, 8), (37, None)):
    torch.manual_seed(k)
    lin = nn.Linear(k, 37, bias=False)
    quantize_(lin, pq.ParetoQWeightOnlyConfig(bits=1.58, group_size=gs), filter_fn=lambda m, f: True)
    w = lin.weight
    old = packing.from_legacy(ref_pack(w.codes().tolist(), 2), k, 1.58)
    for m in (1, 3, 17):
        x = torch.randn(m, k)
        for op, ref in ((torch.ops.paretoq.linear, reference_linear), (torch.ops.paretoq.linear_8da, reference_linear_8da)):
            got = op(x, w.qdata, w.scale, 1.58)
            assert torch.equal(got, op(x, old, w.scale, 1.58))
            r = ref(x, w.qdata, w.scale, 1.58)
            worst = max(worst, ((got - r).abs().max() / r.abs().max()).item())
out["worst"] = worst
print(json.dumps(out))
"""


def _cpu_paths():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    paths = ["scalar"]
    if " avx2 " in flags:
        paths.append("avx2")
    if " avx512_vbmi2 " in flags and " avx512_vnni " in flags:
        paths.append("avx512")
    return paths


@pytest.mark.parametrize("path", _cpu_paths())
def test_each_cpu_path_matches_the_reference_and_the_old_layout(path):
    from paretoq_ao.export import cpu_backend
    assert cpu_backend.available()
    env = dict(os.environ, PARETOQ_KERNEL_PATH=path, PYTHONPATH=os.path.dirname(__file__))
    r = subprocess.run([sys.executable, "-c", _PATHS_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["path"].startswith(path), res
    assert res["worst"] < 1e-4, res


@pytest.mark.parametrize("group_size", [None, 64])
def test_int8_mode_is_the_integer_arithmetic_exactly(group_size):
    lin = _ternary_linear(640, 19, group_size, acts="int8")
    w = lin.weight
    x = torch.randn(4, 640)
    torch.testing.assert_close(lin(x), reference_linear_8da(x, w.qdata, w.scale, 1.58), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# ExecuTorch


def _pte_code_bytes(path) -> int:
    """Bytes of the program's uint8 constants (the packed codes), read from the .pte itself."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    prog = deserialize_pte_binary(open(path, "rb").read()).program
    bufs = prog.constant_buffer
    total = 0
    for v in prog.execution_plan[0].values:
        t = v.val
        if type(t).__name__ == "Tensor" and int(t.scalar_type) == 0 and t.data_buffer_idx > 0:  # Byte
            total += len(bufs[t.data_buffer_idx].storage)
    return total


def test_pte_codes_shrink_by_exactly_the_expected_bytes(tmp_path):
    import paretoq_ao.export as pe

    sizes, models = {}, {}
    for bits in (1.58, 2):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(320, 64, bias=False), nn.ReLU(), nn.Linear(64, 48, bias=False)).eval()
        quantize_(m, pq.ParetoQWeightOnlyConfig(bits=bits), filter_fn=lambda mod, f: isinstance(mod, nn.Linear))
        for order in ("rows", "blocked16"):
            path = pe.export_executorch(m, (torch.randn(1, 320),), tmp_path / f"{bits}-{order}.pte",
                                        activations="int8", weight_order=order)
            sizes[bits, order], models[bits, order] = _pte_code_bytes(path), (m, path)
    # 2-bit fields (the old ternary layout's row length) against ceil(K / 5) bytes, per layer
    assert sizes[2, "rows"] == 64 * 80 + 48 * 16
    assert sizes[2, "rows"] - sizes[1.58, "rows"] == 64 * (80 - 64) + 48 * (16 - 13)
    # blocked16: row bytes padded to whole 16 (13 -> 16 at K = 64; rows are whole 16-row blocks here)
    assert sizes[2, "blocked16"] == 64 * 80 + 48 * 16
    assert sizes[1.58, "blocked16"] == 64 * 64 + 48 * 16
    x = torch.randn(1, 320)
    for order in ("rows", "blocked16"):
        m, path = models[1.58, order]
        f = pe.load_executorch(path)
        pq.set_activations(m, "int8")
        with torch.no_grad():
            assert torch.equal(f(x), m(x))


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_ternary_code_byte_and_truncated_row_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"1.58-bit SEQ format must be in \[0, 3\), got values in \[0, 3\]"):
        pq.pack_codes(torch.tensor([[0, 3, 1]], dtype=torch.uint8), 1.58)
    lin = _ternary_linear(30, 4)
    w = lin.weight
    qdata = w.qdata.clone()
    qdata[2, 3] = packing.TRITS5_INVALID_BYTES[4]
    assert "row 2, byte 3 encodes no 5 ternary codes" in packing.trits5_problem(qdata)
    save_safetensors({"w": pq.ParetoQPackedTensor(qdata, w.scale, 1.58, w.shape)}, tmp_path / "bad.safetensors")
    with pytest.raises(SafetensorsFileError, match=rf"packed tensor .w..*byte {packing.TRITS5_INVALID_BYTES[4]} at row 2, byte 3"):
        load_safetensors(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"do not fit in_features=30.*\[N, 6\]"):
        pq.unpack_codes(w.qdata[:, :5], 30, 1.58)
    with pytest.raises(ValueError, match=r"K=30 needs 6"):
        torch.ops.paretoq.linear(torch.randn(1, 30), w.qdata[:, :5].contiguous(), w.scale, 1.58)
    with pytest.raises(ValueError, match=r"rowbits-v1.*from_legacy"):
        torch.ops.paretoq.linear(torch.randn(1, 30), torch.zeros(4, 8, dtype=torch.uint8), w.scale, 1.58)
    trunc = {"w": pq.ParetoQPackedTensor(w.qdata[:, :5].contiguous(), w.scale, 1.58, w.shape)}
    with pytest.raises(ValueError, match=r"qdata has shape \(4, 5\).*\(4, 6\)"):
        save_safetensors(trunc, tmp_path / "t.safetensors")
        load_safetensors(tmp_path / "t.safetensors")
