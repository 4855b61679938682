"""The ParetoQ recipe API (paretoq_ao.recipe) and evaluation (paretoq_ao.evaluate), on tiny models."""

from __future__ import annotations

import errno
import json
import math
import os
import re

import pytest
import torch

pytest.importorskip("transformers")

from paretoq_ao import recipe as rc  # noqa: E402
from paretoq_ao import serialization  # noqa: E402
from paretoq_ao.workflow import checkpoints, train  # noqa: E402  - private helpers live in their modules
from paretoq_ao.evaluate import perplexity, zero_shot  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


def tiny_recipe(out, **kw):
    base = dict(model="tiny", bits=2, max_chars=60_000, vocab_size=300, block_size=32, batch_size=4,
                steps=6, model_config=dict(TINY), lr=1e-3, output_dir=os.fspath(out), progress=False)
    base.update(kw)
    return rc.QATRecipe(**base)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_budget_and_paper_defaults():
    assert rc.paper_lr(1) == rc.paper_lr(1.58) == rc.paper_lr(2) == 2e-5
    assert rc.paper_lr(3) == rc.paper_lr(4) == 1e-5
    r = rc.QATRecipe(bits=3, batch_size=2, grad_accum=2, block_size=10, tokens=1000, output_dir=None)
    assert r.learning_rate == 1e-5 and r.weight_decay == 0.0
    assert rc.resolve_steps(r) == 25  # 1000 tokens / 40 per step
    r = rc.QATRecipe(batch_size=2, block_size=10, pretrain_tokens=1e4, output_dir=None)  # 10 % of 1e4
    assert rc.resolve_steps(r) == 50
    with pytest.raises(rc.RecipeError, match="no training budget"):
        rc.resolve_steps(rc.QATRecipe(output_dir=None))
    # cosine to zero, no warmup
    f = train._cosine(10)
    assert f(0) == 1.0 and abs(f(10)) < 1e-12 and f(5) == pytest.approx(0.5)


def test_resume_is_bit_identical(tmp_path):
    kw = dict(grad_accum=2, save_every=2)
    full = rc.run_qat(tiny_recipe(tmp_path / "full", **kw))
    assert len(full.losses) == 6 and full.steps == full.total_steps == 6
    assert rc.quantized_layer_count(full.model) == 7  # q k v o gate up down; head stays FP
    assert full.model.lm_head.weight.__class__ is torch.nn.Parameter

    part1 = rc.run_qat(tiny_recipe(tmp_path / "split", stop_after=3, **kw))
    assert part1.steps == 3 and part1.checkpoint.endswith("checkpoint-00000003")
    part2 = rc.run_qat(tiny_recipe(tmp_path / "split", **kw))
    assert part2.resumed_from == 3
    assert part1.losses + part2.losses == full.losses  # exact float equality
    assert _same_state(full.model, part2.model)  # latent weights and scales
    assert part2.tokens == full.tokens == 6 * 2 * 4 * 32

    # the curve: one record per step, a resume marker, readable back
    recs = rc.read_log(tmp_path / "split" / "log.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in recs] == full.losses
    lines = [json.loads(l) for l in open(tmp_path / "split" / "log.jsonl")]
    assert sum(1 for l in lines if l.get("event") == "resume") == 1
    # keep_last=1: only the final checkpoint remains
    assert sorted(n for n in os.listdir(tmp_path / "split") if n.startswith("checkpoint-")) == ["checkpoint-00000006"]


def test_log_survives_a_torn_line(tmp_path):
    path = tmp_path / "log.jsonl"
    log = checkpoints._Log(os.fspath(path))
    log.write({"step": 1, "loss": 2.0})
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # crash mid-write
    log = checkpoints._Log(os.fspath(path))
    log.write({"step": 2, "loss": 1.5})
    assert [r["loss"] for r in rc.read_log(path)] == [2.0, 1.5]


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    rc.run_qat(tiny_recipe(tmp_path, stop_after=2))
    with pytest.raises(rc.CheckpointError) as e:
        rc.run_qat(tiny_recipe(tmp_path, bits=4, group_size=16))
    msg = str(e.value)
    assert "other settings" in msg and "bits=2 (this run: 4)" in msg and "group_size=None (this run: 16)" in msg
    with pytest.raises(rc.CheckpointError, match="already holds a checkpoint"):
        rc.run_qat(tiny_recipe(tmp_path, resume=False))


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = rc.run_qat(tiny_recipe(tmp_path, stop_after=2, save_every=2))
    before = open(os.path.join(first.checkpoint, "model", "model.safetensors"), "rb").read()

    def full_disk(path, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))

    monkeypatch.setattr(serialization, "atomic_write", full_disk)
    with pytest.raises(rc.CheckpointError) as e:
        rc.run_qat(tiny_recipe(tmp_path, stop_after=4, save_every=2))
    assert "disk is full" in str(e.value) and "checkpoint-00000002 is intact" in str(e.value)
    assert rc.latest_checkpoint(tmp_path) == first.checkpoint
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    assert open(os.path.join(first.checkpoint, "model", "model.safetensors"), "rb").read() == before
    monkeypatch.undo()
    # the intact checkpoint resumes and the run completes like an uninterrupted one
    done = rc.run_qat(tiny_recipe(tmp_path, save_every=2))
    ref = rc.run_qat(tiny_recipe(tmp_path / "ref", save_every=2))
    assert done.resumed_from == 2 and _same_state(done.model, ref.model)


def test_model_without_linear_layers(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel  # Conv1D layers, only the head is a Linear

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(rc.RecipeError, match="no linear layers to quantize"):
        rc.run_qat(tiny_recipe(tmp_path, model="gpt2-tiny"), model=model, tokenizer=object())


def test_too_short_data(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words only\n")
    with pytest.raises(rc.RecipeError, match="fewer than one block"):
        rc.run_qat(tiny_recipe(tmp_path / "o", data=os.fspath(short), max_chars=None))


def test_perplexity_matches_the_model_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, **TINY))
    blocks = torch.randint(0, 50, (5, 16))
    out = perplexity(model, blocks, batch_size=2)
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss.item()
    assert out["tokens"] == 5 * 15 and out["blocks"] == 5
    assert out["ppl"] == pytest.approx(math.exp(loss), rel=1e-4)


LOCAL_TASK = """\
task: paretoq_tiny_mc
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_local_task(folder) -> str:
    data = os.path.join(folder, "tiny_mc.jsonl")
    with open(data, "w") as f:
        for i in range(4):
            f.write(json.dumps({"question": f"def f{i}(x):", "choices": [" return x", " import os"], "answer": 0}) + "\n")
    with open(os.path.join(folder, "tiny_mc.yaml"), "w") as f:
        f.write(LOCAL_TASK.format(data=data))
    return os.fspath(folder)


def test_zero_shot_local_task_on_packed_model(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    import lm_eval.tasks

    # Building a TaskManager indexes every lm-eval task folder (seconds on a slow machine); both zero_shot
    # calls below build one for the same include_path from the same files, so build it once and return that
    # same index to both. zero_shot itself is unchanged: it still constructs, queries and passes its manager.
    managers = {}
    real_task_manager = lm_eval.tasks.TaskManager

    def task_manager(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in managers:
            managers[key] = real_task_manager(*args, **kwargs)
        return managers[key]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", task_manager)
    res = rc.run_qat(tiny_recipe(tmp_path / "run", steps=2))
    model = rc.to_packed(res.model)
    from paretoq_ao.packed import ParetoQPackedTensor

    assert isinstance(model.model.layers[0].mlp.down_proj.weight, ParetoQPackedTensor)
    include = write_local_task(tmp_path)
    out = zero_shot(model, res.tokenizer, ["paretoq_tiny_mc"], include_path=include)
    assert 0.0 <= out["paretoq_tiny_mc"]["acc,none"] <= 1.0
    assert out["paretoq_tiny_mc"]["sample_len"] == 4
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        zero_shot(model, res.tokenizer, ["no_such_task_xyz"], include_path=include)


_BAD_RECIPE = [("max_grad_norm", 0.0), ("max_grad_norm", -1.0), ("lr", 0.0), ("lr", float("nan")),
               ("weight_decay", -0.01), ("token_fraction", 0.0), ("token_fraction", 1.5), ("pretrain_tokens", 0),
               ("batch_size", 0), ("grad_accum", 0), ("block_size", 2.5), ("steps", 0), ("tokens", -5),
               ("save_every", -1), ("keep_last", 0), ("stop_after", 0), ("dist_timeout", 0.0), ("seed", -1),
               ("seed", 1.5), ("seed", "1"), ("max_chars", 0), ("vocab_size", True), ("group_size", 0)]


@pytest.mark.parametrize("name,value", _BAD_RECIPE, ids=[f"{n}={v!r}" for n, v in _BAD_RECIPE])
def test_recipe_fields_are_range_checked(name, value):
    """A bad setting is refused when the recipe is made, naming the field and its range."""
    with pytest.raises(rc.RecipeError, match=rf"QATRecipe\.{name} must be .*got {re.escape(repr(value))}"):
        rc.QATRecipe(**{name: value})


def test_recipe_optional_fields_accept_none():
    r = rc.QATRecipe(max_grad_norm=None, lr=None, steps=None, stop_after=None, group_size=None)
    assert r.max_grad_norm is None
    assert rc.QATRecipe(tokens=2e5).tokens == 200000 and isinstance(rc.QATRecipe(tokens=2e5).tokens, int)


def test_bf16_checkpoint_trains_fp32_master_weights():
    """A model that ships in bf16 (most hub checkpoints) trains float32 latent weights, scales and
    optimizer state: at the paper's LR 2e-5 bf16 weights would mostly not move at all."""
    from paretoq_ao.data import PackedBlocks

    model = rc.tiny_llama(64, seed=0, **TINY).to(torch.bfloat16)
    start = {k: v.float().clone() for k, v in model.state_dict().items() if ".layers." in k and k.endswith("proj.weight")}
    blocks = PackedBlocks(torch.randint(0, 64, (4 * 33 * 4,), generator=torch.Generator().manual_seed(0)), 32)
    r = rc.QATRecipe(model="tiny", bits=2, block_size=32, batch_size=4, steps=2, lr=2e-5, output_dir=None,
                     progress=False, bf16=True)
    res = rc.run_qat(r, model=model, train_blocks=blocks)
    dtypes = {p.dtype for p in res.model.parameters()}
    assert dtypes == {torch.float32}, dtypes
    sd = res.model.state_dict()
    changed = sum(int((sd[k].float() != v).sum()) for k, v in start.items())
    total = sum(v.numel() for v in start.values())
    assert changed / total > 0.9, f"only {changed / total:.0%} of the latent weights moved"
