"""The ``paretoq`` command line, run in-process through ``paretoq_ao.cli.main``."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("transformers")

from paretoq_ao.cli import main  # noqa: E402

TINY_CFG = json.dumps(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1))
TINY_QAT = ["qat", "--model", "tiny", "--vocab-size", "300", "--max-chars", "60000", "--block-size", "32",
            "--batch-size", "4", "--tiny-config", TINY_CFG, "--lr", "1e-3", "--no-progress"]


def fails(capsys, argv, *expected):
    """main(argv) must exit 1 with one error line on stderr that contains ``expected``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("paretoq ")]
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_qat_convert_size_eval(tmp_path, capsys):
    run = os.fspath(tmp_path / "run")
    assert main(TINY_QAT + ["--bits", "1.58", "--steps", "3", "--output-dir", run]) == 0
    out = capsys.readouterr().out
    assert "QAT 1.58-bit: step 3/3" in out and os.path.isfile(os.path.join(run, "log.jsonl"))

    packed = os.fspath(tmp_path / "packed")
    assert main(["convert", run, packed]) == 0
    assert "wrote packed model" in capsys.readouterr().out
    cfg = json.load(open(os.path.join(packed, "config.json")))
    assert cfg["quantization_config"]["quant_method"] == "paretoq"
    assert cfg["quantization_config"]["bits"] == 1.58

    assert main(["size", packed]) == 0
    table = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in table and "1.58" in table and "total:" in table

    res = os.fspath(tmp_path / "eval.json")
    assert main(["eval", packed, "--block-size", "32", "--max-chars", "20000", "--max-blocks", "4",
                 "--json", res]) == 0
    assert "perplexity on stdlib[validation]" in capsys.readouterr().out
    assert json.load(open(res))["perplexity"]["tokens"] == 4 * 31


def test_bad_model(tmp_path, capsys, monkeypatch):
    fails(capsys, TINY_QAT + ["--model", "./no/such/model", "--steps", "1", "--output-dir", os.fspath(tmp_path)],
          "no such folder", "./no/such/model")
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    fails(capsys, ["size", os.fspath(a_file)], "is a file")

    import paretoq_ao.hf as pq_hf

    def offline(*a, **k):  # what transformers raises for an unknown hub id (no network in tests)
        raise OSError("some-org/unknown-model is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(pq_hf.AutoModelForCausalLM, "from_pretrained", offline)
    fails(capsys, ["eval", "some-org/unknown-model"], "'some-org/unknown-model' could not be found")


def test_model_without_linear_layers(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from paretoq_ao.data import load_texts, train_tokenizer

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(folder)
    train_tokenizer(load_texts("stdlib", max_chars=20_000), 300).save_pretrained(folder)
    fails(capsys, TINY_QAT + ["--model", os.fspath(folder), "--steps", "1", "--output-dir", os.fspath(tmp_path / "o")],
          "no linear layers to quantize")


def test_empty_and_short_data(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    fails(capsys, TINY_QAT + ["--data", os.fspath(empty), "--steps", "1", "--output-dir", os.fspath(tmp_path / "a")],
          "holds no text")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "def f(): pass"}) + "\n")
    fails(capsys, TINY_QAT[:5] + TINY_QAT[7:] + ["--data", os.fspath(short), "--steps", "1", "--output-dir",
                                                  os.fspath(tmp_path / "b")],
          "fewer than one block")
    fails(capsys, TINY_QAT + ["--data", os.fspath(tmp_path / "missing.txt"), "--steps", "1"], "does not exist")


def test_checkpoint_from_other_settings(tmp_path, capsys):
    run = os.fspath(tmp_path / "run")
    assert main(TINY_QAT + ["--bits", "2", "--steps", "4", "--stop-after", "2", "--output-dir", run]) == 0
    fails(capsys, TINY_QAT + ["--bits", "4", "--steps", "4", "--output-dir", run],
          "other settings", "bits=2 (this run: 4)")
    fails(capsys, ["convert", os.fspath(tmp_path / "nothing"), os.fspath(tmp_path / "o")], "no such checkpoint")


def test_export_packed_model_to_pte_matches_eager(tmp_path, capsys):
    # qat -> convert -> export; the .pte's first decode step equals the packed model's logits.
    import torch

    import paretoq_ao.export as pe
    from paretoq_ao.export.llama import LlamaKVStep
    from paretoq_ao.hf import load_model

    run, packed, pte = (os.fspath(tmp_path / n) for n in ("run", "packed", "m.pte"))
    assert main(TINY_QAT + ["--bits", "2", "--steps", "2", "--output-dir", run]) == 0
    assert main(["convert", run, packed]) == 0
    assert main(["export", packed, pte, "--max-len", "8"]) == 0
    assert os.path.getsize(pte) > 0
    model, _ = load_model(packed, tokenizer=False)
    ids, pos = torch.tensor([[3]]), torch.tensor([0])
    with torch.no_grad():
        want = LlamaKVStep(model, 8)(ids, pos)
    got = pe.load_executorch(pte)(ids, pos)
    got = got[0] if isinstance(got, (list, tuple)) else got
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)  # int8 activations in the kernels
    assert pe.program_activations(pte) == "int8"
    ptef = os.fspath(tmp_path / "mf.pte")  # float activations: exactly the packed model
    assert main(["export", packed, ptef, "--max-len", "8", "--activations", "float"]) == 0
    assert "float activations" in capsys.readouterr().out
    assert pe.program_activations(ptef) == "float"
    gotf = pe.load_executorch(ptef)(ids, pos)
    torch.testing.assert_close(gotf[0] if isinstance(gotf, (list, tuple)) else gotf, want, atol=1e-5, rtol=1e-5)
    fails(capsys, ["export", packed, pte, "--max-len", "0"], "--max-len must be positive")
    # a 4-bit embedding: a smaller file whose output equals the model with that embedding
    from paretoq_ao.export.embedding import quantize_embeddings

    pte4 = os.fspath(tmp_path / "m4.pte")
    assert main(["export", packed, pte4, "--max-len", "8", "--embedding-bits", "4"]) == 0
    assert "4-bit embedding" in capsys.readouterr().out
    emb = model.get_input_embeddings().weight
    assert os.path.getsize(pte) - os.path.getsize(pte4) > emb.numel() * 3  # 4 -> ~0.6 bytes per value
    quantize_embeddings(model, 4, 32)
    with torch.no_grad():
        want4 = LlamaKVStep(model, 8)(ids, pos)
    got4 = pe.load_executorch(pte4)(ids, pos)
    got4 = got4[0] if isinstance(got4, (list, tuple)) else got4
    torch.testing.assert_close(got4, want4, atol=0.05, rtol=0.05)


def test_bad_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["qat", "--bits", "5"])
    assert e.value.code == 2
    assert "bits must be 1, 1.58, 2, 3 or 4" in capsys.readouterr().err


def test_demo_tiny(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "demo"
    assert main(["demo", "--pretrain-steps", "10", "--batch-size", "4", "--block-size", "32", "--vocab-size", "300",
                 "--max-chars", "60000", "--val-chars", "20000", "--eval-blocks", "8", "--hidden-size", "32",
                 "--intermediate-size", "64", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                 "--out-dir", os.fspath(out_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = [l.split() for l in out.splitlines()]
    qat = {r[2]: r for r in rows if r[:2] == ["ParetoQ", "QAT"]}
    rtn = {r[1]: r for r in rows if r[:1] == ["RTN"]}
    assert set(qat) == set(rtn) == {"4", "3", "2", "1.58", "1"}
    fp = next(r for r in rows if r[:2] == ["full", "precision"])
    # stored size shrinks with the bit width; every model is smaller than full precision
    sizes = [float(qat[b][4]) for b in ("4", "3", "2", "1")]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] < float(fp[4])
    assert all(float(qat[b][5]) > 0 for b in qat)
    png = out_dir / "pareto.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(out_dir) if n.startswith(".tmp")]
