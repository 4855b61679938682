"""llama.cpp itself runs the exported GGUF files: its logits for a small packed Llama at every bit
width match the eager packed model (the oracle), and greedy decoding picks the same tokens; the same
for Mistral, Qwen2 and Qwen3 models and for Llama 3's RoPE scaling.

llama.cpp comes from the ``llama-cpp-python`` package (its vendored llama.cpp, compiled on install;
``.ci/run`` installs it for this CPU's instruction sets, without AMX). llama.cpp runs in a subprocess
(``_llamacpp_worker.py``): a crash fails one test with its signal; SIGILL (a build for another CPU)
skips, saying so. Tolerance: llama.cpp quantizes the
activations of a quantized matmul to 8 bits per 32 (Q8_0) or 256 (Q8_K) values before the integer
dot products, so its logits differ from the float-activation eager model by about 1 % (relative
L2, measured per type below); F32 files agree to float rounding.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (.ci/run installs it: pip install llama-cpp-python "
                        "with the CMAKE_ARGS given there)")

from paretoq_ao import ParetoQWeightOnlyConfig, quantize  # noqa: E402
from paretoq_ao.export.gguf import export_gguf  # noqa: E402

from test_gguf import LLAMA3_ROPE, gguf_llama, gguf_llama_rope, gguf_mistral, gguf_qwen  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

# relative L2 of llama.cpp's logits against the eager packed model (8-bit activations in llama.cpp)
TOLERANCE = {4: 0.03, 3: 0.03, 2: 0.03, 1.58: 0.03, 1: 0.03}
N_TOKENS = 16


@pytest.fixture(scope="module")
def tokenizer():
    from paretoq_ao.workflow.data import load_texts, train_tokenizer

    return train_tokenizer(load_texts("stdlib", "train", max_chars=100_000), 300)


WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_llamacpp_worker.py")


def _run_llama(mode, path, ids, *extra):
    """Run llama.cpp in a subprocess (tests/_llamacpp_worker.py); its result array."""
    out = str(path) + f".{mode}.npy"
    p = subprocess.run([sys.executable, WORKER, mode, str(path), out, ",".join(map(str, ids)), *map(str, extra)],
                       capture_output=True, text=True, timeout=300)
    if p.returncode == -signal.SIGILL:
        pytest.skip("llama.cpp died of SIGILL: it was built for instructions this CPU lacks (rebuild it: .ci/run)")
    assert p.returncode == 0, f"llama.cpp worker exited with {p.returncode}: {p.stderr[-2000:]}"
    return np.load(out)


def _llama_logits(path, ids):
    return _run_llama("logits", path, ids)


def _eager(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("bits", [4, 3, 2, 1.58, 1])
def test_llama_cpp_logits_match_the_packed_model(tmp_path, tokenizer, bits):
    model = gguf_llama(seed=7)
    quantize(model, ParetoQWeightOnlyConfig(bits=bits))
    path = tmp_path / f"m{bits}.gguf"
    assert export_gguf(model, tokenizer, path, embedding_type="F32", head_type="F32")["inexact"] == []
    ids = torch.randint(0, 300, (N_TOKENS,), generator=torch.Generator().manual_seed(1)).tolist()
    ref, got = _eager(model, ids), _llama_logits(path, ids)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < TOLERANCE[bits], f"{bits}-bit: llama.cpp logits differ by {rel:.2%}"
    # a wrong row order (rotary permutation), scale or code would give a relative error near 1
    err = np.abs(got - ref).max()
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * err  # positions where rounding cannot flip the argmax
    assert clear.sum() >= N_TOKENS // 4
    assert np.array_equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_greedy_decoding_agrees(tmp_path, tokenizer):
    model = gguf_llama(seed=11)
    quantize(model, ParetoQWeightOnlyConfig(bits=2))
    path = tmp_path / "g.gguf"
    export_gguf(model, tokenizer, path, embedding_type="F32", head_type="F32")
    prompt = [5, 17, 42, 99]
    seq = list(prompt)
    for _ in range(6):  # eager greedy continuation
        seq.append(int(_eager(model, seq)[-1].argmax()))
    got = _run_llama("generate", path, prompt, 6).tolist()
    ref = _eager(model, seq[:-1])[len(prompt) - 1:]
    margins = np.sort(ref, axis=-1)[:, -1] - np.sort(ref, axis=-1)[:, -2]
    agree = [g == s for g, s in zip(got, seq[len(prompt):])]
    # every token agrees up to the first position whose top-2 margin is within llama.cpp's activation rounding
    first_close = next((i for i, m in enumerate(margins) if m < 0.02), len(agree))
    assert all(agree[:first_close]) and first_close >= 2, (got, seq[len(prompt):], margins)


def test_llama_cpp_runs_an_exported_mistral(tmp_path, tokenizer):
    model = gguf_mistral(seed=3, layers=2)
    quantize(model, ParetoQWeightOnlyConfig(bits=2))
    path = tmp_path / "mistral.gguf"
    export_gguf(model, tokenizer, path, embedding_type="F32", head_type="F32")
    ids = list(range(3, 3 + N_TOKENS))
    ref, got = _eager(model, ids), _llama_logits(path, ids)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < TOLERANCE[2]


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_llama_cpp_runs_exported_qwen(tmp_path, tokenizer, kind):
    model = gguf_qwen(kind, seed=5, layers=2)
    quantize(model, ParetoQWeightOnlyConfig(bits=2))
    path = tmp_path / f"{kind}.gguf"
    export_gguf(model, tokenizer, path, embedding_type="F32", head_type="F32")
    ids = torch.randint(0, 300, (N_TOKENS,), generator=torch.Generator().manual_seed(4)).tolist()
    ref, got = _eager(model, ids), _llama_logits(path, ids)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < TOLERANCE[2], f"{kind}: llama.cpp logits differ by {rel:.2%}"
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.8


def test_llama_cpp_follows_llama3_rope_scaling(tmp_path, tokenizer):
    model = gguf_llama_rope(LLAMA3_ROPE, seed=9, layers=2)
    quantize(model, ParetoQWeightOnlyConfig(bits=4))
    path = tmp_path / "llama3.gguf"
    export_gguf(model, tokenizer, path, embedding_type="F32", head_type="F32")
    ids = torch.randint(0, 300, (48,), generator=torch.Generator().manual_seed(2)).tolist()  # past 16 positions
    got = _llama_logits(path, ids)
    ref = _eager(model, ids)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    # the same model with plain RoPE: what llama.cpp would compute had the factors been lost
    rot = model.model.rotary_emb
    scaled = rot.inv_freq.clone()
    rot.inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    try:
        unscaled = _eager(model, ids)
    finally:
        rot.inv_freq = scaled
    rel_plain = np.linalg.norm(got - unscaled) / np.linalg.norm(unscaled)
    assert rel < TOLERANCE[4] and rel_plain > 3 * rel, (rel, rel_plain)
