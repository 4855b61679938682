"""Serving (paretoq_ao.generate and ``paretoq generate``): a tiny Llama built from a config with an
offline BPE tokenizer, packed at 2 bits and saved with ``hf.save_quantized``. No downloads, no
timing assertions."""

from __future__ import annotations

import os
import re

import pytest
import torch
from torchao import quantize_

pytest.importorskip("transformers")

import paretoq_ao.hf as pq_hf  # noqa: E402
from paretoq_ao import ParetoQQATConfig, ParetoQWeightOnlyConfig  # noqa: E402
from paretoq_ao.cli import main  # noqa: E402
from paretoq_ao.generate import GenerationResult, generate, load_packed  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "def main():\n    return"
N = 12
TIMING = re.compile(r"^prefill: (\d+) tokens in \d+\.\d{3} s \(\d+\.\d tok/s\); decode: (\d+) tokens in \d+\.\d{2} s "
                    r"\(\d+\.\d tok/s\); threads (\d+), device (\S+), compiled (yes|no)$")


def _llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """(folder, in-memory packed model, tokenizer)."""
    from paretoq_ao.data import load_texts, train_tokenizer

    tok = train_tokenizer(load_texts("stdlib", max_chars=20_000), 300)
    model = _llama(len(tok))
    quantize_(model, ParetoQWeightOnlyConfig(bits=2))
    folder = tmp_path_factory.mktemp("gen") / "packed"
    pq_hf.save_quantized(model, tok, folder)
    return os.fspath(folder), model, tok


def _direct(model, tok, prompt=PROMPT, n=N):
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


class _Collect:
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


def test_api_returns_the_tokens_of_model_generate(packed):
    folder, model, tok = packed
    want = _direct(model, tok)
    res = generate(folder, PROMPT, N, device="cpu")
    assert isinstance(res, GenerationResult) and res.tokens == want and len(want) == N  # no early EOS
    assert res.prompt_tokens == len(tok(PROMPT)["input_ids"])
    assert res.text == tok.decode(want, skip_special_tokens=True)
    assert res.prefill_s > 0 and res.decode_s >= 0 and res.total_s >= res.prefill_s + res.decode_s
    assert res.prefill_tokens_per_s == pytest.approx(res.prompt_tokens / res.prefill_s)
    assert res.decode_tokens == len(want) - 1
    assert (res.device, res.compiled, res.threads) == ("cpu", False, 1)
    # an already-loaded model, other threads (restored afterwards), a user streamer still fed
    seen = _Collect()
    res2 = generate(model, PROMPT, N, tokenizer=tok, threads=2, streamer=seen)
    assert res2.tokens == want and res2.threads == 2 and torch.get_num_threads() == 1
    assert seen.ended and [t for put in seen.puts[1:] for t in put] == want
    assert TIMING.match(res2.summary()).groups() == (str(res.prompt_tokens), str(len(want) - 1), "2", "cpu", "no")


def test_compile_gives_the_eager_tokens(packed):
    from torch._dynamo.utils import counters

    folder, model, tok = packed
    loaded, tok2 = load_packed(folder, device="cpu")
    res = generate(loaded, PROMPT, N, tokenizer=tok2, compile=True)
    assert res.compiled and res.tokens == _direct(model, tok)
    assert loaded._compiled_call_impl is not None  # compiled in place, once
    graphs = counters["stats"]["unique_graphs"]
    other = "import os\nimport sys\n\nclass Foo(object):"  # another prompt length: no recompilation
    assert generate(loaded, other, 5, tokenizer=tok2, compile=True).tokens == _direct(model, tok, other, 5)
    assert counters["stats"]["unique_graphs"] == graphs


def test_cli_prints_text_and_timing_line(packed, capsys):
    folder, model, tok = packed
    capsys.readouterr()
    assert main(["generate", folder, "--prompt", PROMPT, "--max-new-tokens", str(N), "--threads", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    text, _, last = out.rstrip("\n").rpartition("\n")
    want = _direct(model, tok)
    assert text == tok.decode(want, skip_special_tokens=True)
    m = TIMING.match(last)
    assert m, last
    assert m.groups()[1:] == (str(len(want) - 1), "1", "cpu", "no")


def _fails(capsys, argv, code, *expected):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("paretoq generate: error")]
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]


def test_cli_errors(packed, tmp_path, capsys, monkeypatch):
    folder, _, tok = packed
    _fails(capsys, ["generate", os.fspath(tmp_path / "nothing"), "--prompt", "x"], 1, "no such folder")
    float_dir = tmp_path / "float"
    _llama(len(tok)).save_pretrained(float_dir)
    tok.save_pretrained(float_dir)
    _fails(capsys, ["generate", os.fspath(float_dir), "--prompt", "x"], 1, "not a packed ParetoQ model",
           "paretoq convert")
    qat = _llama(len(tok))
    quantize_(qat, ParetoQQATConfig(bits=2))
    pq_hf.save_qat_checkpoint(qat, tmp_path / "qat", tok)
    _fails(capsys, ["generate", os.fspath(tmp_path / "qat"), "--prompt", "x"], 1, "QAT checkpoint",
           "paretoq convert")
    _fails(capsys, ["generate", folder, "--prompt", "x", "--max-new-tokens", "0"], 2, "--max-new-tokens")
    _fails(capsys, ["generate", folder, "--prompt", "x", "--threads", "0"], 2, "--threads")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fails(capsys, ["generate", folder, "--prompt", "x", "--device", "cuda"], 1, "CUDA is not available")


def test_api_errors(packed):
    folder, model, tok = packed
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(folder, PROMPT, 0)
    with pytest.raises(ValueError, match="threads"):
        generate(model, PROMPT, tokenizer=tok, threads=0)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, PROMPT)
    with pytest.raises(ValueError, match="no tokens"):
        generate(model, "", tokenizer=tok)
