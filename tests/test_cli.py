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


def bad_flag(capsys, argv, flag, *expected):
    """main(argv) must exit 2 (argparse) with one error line naming ``flag`` and ``expected``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1, err
    assert f"argument {flag}" in lines[0], lines[0]
    for text in expected:
        assert text in lines[0], lines[0]


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


@pytest.fixture(scope="module")
def run_2bit(tmp_path_factory):
    """One `paretoq qat` run (2 bits, 2 steps) and its `paretoq convert`ed folder, shared by the tests that
    only read them: (run folder, packed folder). The run keeps its last checkpoint, checkpoint-00000002."""
    tmp = tmp_path_factory.mktemp("cli-2bit")
    run, packed = os.fspath(tmp / "run"), os.fspath(tmp / "packed")
    assert main(TINY_QAT + ["--bits", "2", "--steps", "2", "--output-dir", run]) == 0
    assert main(["convert", run, packed]) == 0
    return run, packed


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


def test_export_packed_model_to_pte_matches_eager(run_2bit, tmp_path, capsys):
    # qat -> convert (the run_2bit fixture) -> export; the .pte's first decode step equals the packed model's logits.
    import torch

    import paretoq_ao.export as pe
    from paretoq_ao.export.llama import LlamaKVStep
    from paretoq_ao.hf import load_model

    _, packed = run_2bit
    pte = os.fspath(tmp_path / "m.pte")
    capsys.readouterr()
    assert main(["export", packed, pte, "--max-len", "8"]) == 0
    assert os.path.getsize(pte) > 0
    # the packed folder holds float32 scales: the export says nothing about a conversion
    assert "converted" not in capsys.readouterr().out
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
    # the row order: another program (other ops), the same logits bit for bit
    ptr = os.fspath(tmp_path / "mr.pte")
    assert main(["export", packed, ptr, "--max-len", "8", "--weight-order", "rows"]) == 0
    assert "rows weight order" in capsys.readouterr().out
    assert b"paretoq::linear_8da_b16" in open(pte, "rb").read() and b"_b16" not in open(ptr, "rb").read()
    gotr = pe.load_executorch(ptr)(ids, pos)
    assert torch.equal(gotr[0] if isinstance(gotr, (list, tuple)) else gotr, got)
    bad_flag(capsys, ["export", packed, pte, "--max-len", "0"], "--max-len", ">= 1")
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
                 "--out-dir", os.fspath(out_dir), "--no-progress", "--save-models"]) == 0
    out = capsys.readouterr().out
    rows = [l.split() for l in out.splitlines()]
    qat = {r[2]: r for r in rows if r[:2] == ["ParetoQ", "QAT"]}
    rtn = {r[1]: r for r in rows if r[:1] == ["RTN"]}
    assert set(qat) == set(rtn) == {"4", "3", "2", "1.58", "1"}
    fp = next(r for r in rows if r[:2] == ["full", "precision"])
    # stored size shrinks with the bit width; every model is smaller than full precision
    sizes = [float(qat[b][4]) for b in ("4", "3", "2", "1.58", "1")]  # ternary below 2-bit (trits5)
    assert sizes == sorted(sizes, reverse=True) and sizes[0] < float(fp[4])
    assert all(float(qat[b][5]) > 0 for b in qat)
    png = out_dir / "pareto.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the table is kept next to the plot, as Markdown and as JSON, with the same numbers as printed
    doc = json.loads((out_dir / "pareto.json").read_text())
    got = {(r["label"], r["bits"]): r for r in doc["rows"]}
    assert len(got) == 11 and doc["settings"]["pretrain_steps"] == 10
    assert f"{got[('ParetoQ QAT', 2)]['ppl']:.2f}" == qat["2"][5]
    # --save-models: each packed model is a folder that the other commands take
    assert main(["size", os.fspath(out_dir / "paretoq-1.58bit")]) == 0
    assert "1.58" in capsys.readouterr().out
    md = (out_dir / "pareto.md").read_text()
    assert md.startswith("| model | bits |") and f"| ParetoQ QAT | 1.58 | {float(qat['1.58'][3]):.3f} |" in md
    assert not [n for n in os.listdir(out_dir) if n.startswith(".tmp")]


# Every numeric flag of every command refuses values outside its range, naming the flag, before
# anything runs (--max-grad-norm 0 used to stop training silently, a negative value to ascend).
_BAD_FLAGS = [
    ("qat", "--max-grad-norm", "0", "> 0"), ("qat", "--max-grad-norm", "-1", "> 0"),
    ("qat", "--lr", "0", "> 0"), ("qat", "--lr", "-2e-5", "> 0"), ("qat", "--lr", "nan", "> 0"),
    ("qat", "--weight-decay", "-0.1", ">= 0"), ("qat", "--token-fraction", "0", "(0, 1]"),
    ("qat", "--token-fraction", "1.5", "(0, 1]"), ("qat", "--pretrain-tokens", "0", "> 0"),
    ("qat", "--batch-size", "0", ">= 1"), ("qat", "--grad-accum", "0", ">= 1"), ("qat", "--block-size", "-3", ">= 1"),
    ("qat", "--vocab-size", "0", ">= 1"), ("qat", "--group-size", "0", ">= 1"), ("qat", "--steps", "0", ">= 1"),
    ("qat", "--tokens", "1.5", ">= 1"), ("qat", "--save-every", "-1", ">= 0"), ("qat", "--keep-last", "0", ">= 1"),
    ("qat", "--stop-after", "0", ">= 1"), ("qat", "--seed", "-1", "[0, 2**63)"), ("qat", "--dist-timeout", "0", "> 0"),
    ("qat", "--max-chars", "0", ">= 1"), ("qat", "--bits", "5", "1, 1.58, 2, 3 or 4"),
    ("eval", "--max-blocks", "0", ">= 1"), ("eval", "--batch-size", "0", ">= 1"), ("eval", "--block-size", "0", ">= 1"),
    ("eval", "--num-fewshot", "-1", ">= 0"), ("eval", "--limit", "0", "> 0"),
    ("export", "--max-len", "-5", ">= 1"), ("generate", "--max-new-tokens", "0", ">= 1"),
    ("generate", "--threads", "0", ">= 1"), ("demo", "--pretrain-steps", "0", ">= 1"),
    ("demo", "--qat-fraction", "2", "(0, 1]"), ("demo", "--eval-blocks", "0", ">= 1"), ("demo", "--layers", "0", ">= 1"),
    ("demo", "--lr-scale", "0", "> 0"), ("demo", "--heads", "x", "expected a number"),
]
_POSITIONALS = {"eval": ["m"], "export": ["m", "out.pte"], "generate": ["m", "--prompt", "hi"]}


@pytest.mark.parametrize("cmd,flag,value,expected", _BAD_FLAGS, ids=[f"{c}{f}={v}" for c, f, v, _ in _BAD_FLAGS])
def test_numeric_flags_are_checked(capsys, tmp_path, cmd, flag, value, expected):
    argv = [cmd] + _POSITIONALS.get(cmd, []) + [f"{flag}={value}"]
    if cmd == "qat":
        argv += ["--output-dir", str(tmp_path / "run")]
    bad_flag(capsys, argv, flag, expected)
    assert not os.path.exists(tmp_path / "run")


def test_max_grad_norm_none_turns_clipping_off():
    from paretoq_ao.cli import build_parser

    a = build_parser().parse_args(["qat", "--max-grad-norm", "none"])
    assert a.max_grad_norm is None


def test_commands_on_each_others_folders(run_2bit, tmp_path, capsys):
    """qat given a packed folder, a QAT checkpoint or a qat output folder as --model; size and eval
    given a qat output folder or a checkpoint-N folder: each gets what it can use or one line saying
    what to run instead."""
    run, packed = run_2bit
    capsys.readouterr()
    new = ["--steps", "1", "--output-dir", os.fspath(tmp_path / "o"), "--no-progress"]
    fails(capsys, ["qat", "--model", packed] + new, "is packed", "full-precision model")
    fails(capsys, ["qat", "--model", run] + new, "`paretoq qat` output folder", f"--output-dir {run}",
          "paretoq convert")
    ckpt_model = os.path.join(run, "checkpoint-00000002", "model")
    fails(capsys, ["qat", "--model", ckpt_model] + new, "is a QAT checkpoint", "paretoq convert")
    assert not os.path.exists(tmp_path / "o")
    for src in (run, os.path.join(run, "checkpoint-00000002")):
        assert main(["size", src]) == 0
        out = capsys.readouterr().out
        assert "model.layers.0.self_attn.q_proj" in out and "is a QAT checkpoint" in out and "paretoq convert" in out


def test_tokenizer_larger_than_the_embedding(tmp_path, capsys):
    from paretoq_ao.data import load_texts, train_tokenizer
    from paretoq_ao.recipe import tiny_llama

    folder = tmp_path / "small-emb"
    tok = train_tokenizer(load_texts("stdlib", max_chars=20_000), 300)
    tiny_llama(len(tok) - 10, **json.loads(TINY_CFG)).save_pretrained(folder)
    tok.save_pretrained(folder)
    fails(capsys, TINY_QAT + ["--model", os.fspath(folder), "--steps", "1", "--output-dir", os.fspath(tmp_path / "o")],
          f"{len(tok)} tokens", f"only {len(tok) - 10} rows")


def test_misspelled_tiny_config_and_missing_cuda(tmp_path, capsys):
    import torch

    run = os.fspath(tmp_path / "o")
    argv = TINY_QAT[:-5] + ["--lr", "1e-3", "--no-progress", "--steps", "1", "--output-dir", run]
    fails(capsys, argv + ["--tiny-config", '{"hidden_sise": 32}'], "'hidden_sise' (did you mean 'hidden_size'?)")
    fails(capsys, argv + ["--tiny-config", '{"num_hidden_layers": 0}'], "num_hidden_layers", ">= 1")
    if not torch.cuda.is_available():
        fails(capsys, argv + ["--device", "cuda"], "'cuda' requested but CUDA is not available")
    assert not os.path.exists(run)


# --------------------------------------------------------------------------- export: what the folder holds

def _tiny_llama_folder(folder, dtype, packed=True):
    """A tiny Llama saved as a packed folder (``save_quantized``) in ``dtype``, or as a QAT
    checkpoint (``save_qat_checkpoint``)."""
    import torch
    from torchao import quantize_
    from transformers import LlamaConfig, LlamaForCausalLM

    from paretoq_ao import ParetoQQATConfig, ParetoQWeightOnlyConfig
    from paretoq_ao.hf import save_qat_checkpoint, save_quantized

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval().to(dtype)
    if packed:
        quantize_(model, ParetoQWeightOnlyConfig(bits=2, group_size=32))
        save_quantized(model, None, folder)
    else:
        quantize_(model, ParetoQQATConfig(bits=2))
        save_qat_checkpoint(model, folder)
    return os.fspath(folder)


def test_export_qat_folder_says_convert_first(run_2bit, tmp_path, capsys):
    # a save_qat_checkpoint folder, a qat --output-dir, its checkpoint-N and checkpoint-N/model folders
    import torch

    qat_dir = _tiny_llama_folder(tmp_path / "qat", torch.float32, packed=False)
    run, _ = run_2bit
    ckpt = os.path.join(run, open(os.path.join(run, "latest")).read().strip())
    pte = os.fspath(tmp_path / "m.pte")
    for folder in (qat_dir, run, ckpt, os.path.join(ckpt, "model")):
        line = fails(capsys, ["export", folder, pte], "is a QAT checkpoint", f"paretoq convert {folder} <out>")
        assert "FSDP" not in line, line
        assert not os.path.exists(pte)


def test_export_half_precision_packed_folder(tmp_path, capsys):
    # bf16 / fp16 scales: exported with float32 copies of the scales (the codes stay), said so
    import torch

    import paretoq_ao.export as pe
    from paretoq_ao.export.llama import LlamaKVStep
    from paretoq_ao.hf import load_model

    ids, pos = torch.tensor([[3]]), torch.tensor([0])
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        folder = _tiny_llama_folder(tmp_path / name, dtype)
        pte = os.fspath(tmp_path / f"{name}.pte")
        capsys.readouterr()
        assert main(["export", folder, pte, "--max-len", "8", "--activations", "float"]) == 0
        out = capsys.readouterr().out
        assert f"{name} scales and weights converted to float32" in out and "codes unchanged" in out, out
        model, _ = load_model(folder, tokenizer=False)
        w = model.model.layers[0].self_attn.q_proj.weight
        assert w.scale.dtype == dtype
        codes = w.qdata.clone()
        assert pe.to_float32(model)
        assert torch.equal(model.model.layers[0].self_attn.q_proj.weight.qdata, codes)
        with torch.no_grad():
            want = LlamaKVStep(model, 8)(ids, pos)
        got = pe.load_executorch(pte)(ids, pos)
        got = got[0] if isinstance(got, (list, tuple)) else got
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the default (int8 activations) exports too (that a float32 folder says nothing about conversion is
    # checked on the float32 folder of test_export_packed_model_to_pte_matches_eager, also int8 activations)
    assert main(["export", folder, os.fspath(tmp_path / "i8.pte"), "--max-len", "8"]) == 0
    assert "converted to float32" in capsys.readouterr().out


def _fake_qat(made_group: bool):
    """A stand-in for run_qat that returns at once (the CLI's process-group handling is under test);
    with ``made_group`` it brings a one-rank gloo group up, as run_qat does under torchrun."""
    import torch.distributed as dist

    from paretoq_ao.workflow.settings import QATResult

    def run(r):
        if made_group:
            dist.init_process_group("gloo", init_method=f"file://{r.output_dir}/pg", rank=0, world_size=1)
        return QATResult(model=None, tokenizer=None, steps=0, total_steps=1, tokens=0, losses=[],
                         checkpoint=None, log_path=None)
    return run


@pytest.mark.parametrize("group_before", [False, True])
def test_qat_tears_down_only_its_own_process_group(tmp_path, capsys, monkeypatch, group_before):
    import torch.distributed as dist

    from paretoq_ao.workflow import train

    out = tmp_path / "run"
    out.mkdir()
    if group_before:  # a caller's group: main() must leave it up
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/caller-pg", rank=0, world_size=1)
    monkeypatch.setattr(train, "run_qat", _fake_qat(made_group=not group_before))
    try:
        assert main(["qat", "--output-dir", str(out)]) == 0
        assert dist.is_initialized() == group_before
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
