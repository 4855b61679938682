"""Data (paretoq_ao.data): stdlib / local / `datasets` sources, offline BPE tokenizer, packed blocks
with a resumable order, and clear errors for bad input. No network."""

from __future__ import annotations

import json
import os
import pytest
import torch

import paretoq_ao.data as D

pytestmark = pytest.mark.usefixtures("single_thread")

CODE = ["def add(a, b):\n    \"\"\"Return the sum.\"\"\"\n    return a + b\n" * 30,
        "class Stack:\n    def push(self, x):\n        self.items.append(x)\n" * 30]


@pytest.fixture(scope="module")
def tok():
    return D.train_tokenizer(CODE, vocab_size=320)


# ----------------------------------------------------------------------------- sources

def test_stdlib_split_is_deterministic_and_by_file(tmp_path):
    a = D.stdlib_texts("train", max_chars=200_000)
    assert a == D.stdlib_texts("train", max_chars=200_000)
    assert len(a) > 1 and sum(map(len, a)) >= 200_000 and '"""' in "".join(a)
    val = D.stdlib_texts("validation", max_chars=50_000)
    assert val and not set(val) & set(a)
    # on a small fake stdlib the two splits partition the files, decided by relative path only
    for i in range(60):
        sub = tmp_path / f"pkg{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"m{i}.py").write_text(f"x = {i}\n")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "other.py").write_text("y = 1\n")
    tr, va, al = (D.stdlib_texts(s, root=tmp_path, val_percent=20) for s in ("train", "validation", "all"))
    assert sorted(tr + va) == sorted(al) and len(al) == 60 and va and tr
    assert "y = 1\n" not in al


def test_datasets_source_calls_load_dataset(monkeypatch):
    import datasets

    calls = []

    class FakeDataset:
        column_names = ["text"]

        def __getitem__(self, key):
            assert key == "text"
            return ["", " = Title = \n", "   ", "Some real text .\n"]

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return FakeDataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    texts = D.load_texts("wikitext", "validation")
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "validation"})]
    assert texts == [" = Title = \n", "Some real text .\n"]  # empty rows dropped
    D.load_texts("someone/corpus", "train", dataset_config="cfg")
    assert calls[-1] == (("someone/corpus", "cfg"), {"split": "train"})
    with pytest.raises(ValueError, match="no column 'body'"):
        D.load_texts("wikitext", text_field="body")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(OSError, match="dataset 'wikitext'.*could not be loaded locally or downloaded.*no network"):
        D.load_texts("wikitext")


def test_local_txt_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc line 1\nline 2\n\n\nsecond doc\n\nthird\n")
    assert D.load_texts(txt, "all") == ["first doc line 1\nline 2", "second doc", "third"]
    jl = tmp_path / "b.jsonl"
    rows = [{"text": f"document number {i}", "body": f"body {i}"} for i in range(50)]
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert D.load_texts(jl, "all") == [r["text"] for r in rows]
    assert D.load_texts(str(jl), "all", text_field="body") == [r["body"] for r in rows]
    tr, va = D.load_texts(jl, "train"), D.load_texts(jl, "validation", val_percent=5)
    assert va and sorted(tr + va) == sorted(r["text"] for r in rows)
    assert D.load_texts(jl, "train") == tr  # deterministic
    # a folder: its .txt and .jsonl files in sorted order
    assert D.load_texts(tmp_path, "all") == D.load_texts(txt, "all") + D.load_texts(jl, "all")
    assert D.load_texts(jl, "all", max_chars=40) == [r["text"] for r in rows[:3]]


def _fortunes_dir(path):
    path.mkdir()
    (path / "wisdom").write_text("Know thyself.\n\t\t-- Socrates\n%\nA second\nfortune.\n%\n")
    (path / "art").write_text("Art is long.\n%\n\n%\nLife is short.\n")  # an empty record is dropped
    (path / "wisdom.dat").write_bytes(b"\x00\x02\x00\x00binary index")  # strfile index: not text
    (path / "wisdom.u8").symlink_to("wisdom")  # the package's UTF-8 links: not read twice
    (path / "ascii-art").write_text("  /\\_/\\\n ( o.o )\n%\n")  # pictures, not language
    return path


def test_fortunes_source(tmp_path, monkeypatch):
    root = _fortunes_dir(tmp_path / "fortunes")
    got = D.fortune_texts(root=root)
    assert got == ["Art is long.", "Life is short.", "Know thyself.\n\t\t-- Socrates", "A second\nfortune."]
    # split by record, like local files: validation and train partition "all"
    val, train = D.fortune_texts("validation", val_percent=50, root=root), D.fortune_texts("train", 50, root=root)
    assert sorted(val + train) == sorted(got) and not set(val) & set(train)
    monkeypatch.setenv("PARETOQ_FORTUNES_DIR", str(root))
    assert D.load_texts("fortunes", "all") == got
    assert D.load_texts("fortunes", "all", max_chars=5) == got[:1]
    with pytest.raises(FileNotFoundError, match="fortunes folder .*nowhere.*apt-get install fortunes"):
        D.fortune_texts(root=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no fortunes in"):
        D.fortune_texts(root=tmp_path / "empty")


@pytest.mark.skipif(not os.path.isdir(D.FORTUNES_DIR), reason=f"Debian's fortunes package is not installed "
                    f"({D.FORTUNES_DIR}); apt-get install fortunes")
def test_real_fortunes_package(monkeypatch):
    monkeypatch.delenv("PARETOQ_FORTUNES_DIR", raising=False)
    texts = D.load_texts("fortunes", "all")
    assert len(texts) > 5000 and sum(map(len, texts)) > 1_000_000
    assert not any(line.strip() == "%" for t in texts for line in t.splitlines())  # every separator split on


def test_bad_local_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        D.load_texts(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="nope"):
        D.load_texts(str(tmp_path / "nope" / "x"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no field 'text' \(has \['content'\]\)"):
        D.load_texts(bad)
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        D.load_texts(bad)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        D.load_texts(tmp_path / "bin.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        D.load_texts(tmp_path / "empty")
    with pytest.raises(ValueError, match="split"):
        D.load_texts("stdlib", "test")


def test_unreadable_file(tmp_path, monkeypatch):
    f = tmp_path / "secret.txt"
    f.write_text("text")

    def denied(path, *a, **k):  # chmod 000 does not stop root, so simulate the denial
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(D, "open", denied, raising=False)
    with pytest.raises(PermissionError, match=r"secret\.txt.*cannot be read \(permission denied\)"):
        D.load_texts(f)


# ----------------------------------------------------------------------------- tokenizer

def test_train_tokenizer_is_deterministic_and_wrapped(tok, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    assert isinstance(tok, PreTrainedTokenizerFast)
    assert 257 < len(tok) <= 320 and tok.eos_token == D.EOS_TOKEN and tok.eos_token_id == 0
    again = D.train_tokenizer(CODE, vocab_size=320)
    assert again.get_vocab() == tok.get_vocab()
    text = "def push(self, x):\n    return a + b  # ünïcode\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text.encode()) * 0.6  # merges learned
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == ids
    with pytest.raises(ValueError, match="vocab_size"):
        D.train_tokenizer(CODE, vocab_size=100)
    with pytest.raises(ValueError, match="no text"):
        D.train_tokenizer(["", ""], vocab_size=300)


def test_tokenize_separates_documents_with_eos(tok):
    t = D.tokenize(["a + b", "x"], tok)
    assert t.dtype == torch.long
    a, x = tok("a + b")["input_ids"], tok("x")["input_ids"]
    assert t.tolist() == a + [0] + x + [0]


# ----------------------------------------------------------------------------- blocks

def test_packed_blocks_and_errors():
    b = D.PackedBlocks(torch.arange(103), 10, source="src")
    assert len(b) == 10 and torch.equal(b[3], torch.arange(30, 40))
    with pytest.raises(ValueError, match=r"'tiny\.txt\[train\]' has 7 tokens, fewer than one block of 8"):
        D.PackedBlocks(torch.arange(7), 8, source="tiny.txt[train]")
    with pytest.raises(ValueError, match="has 0 tokens"):
        D.PackedBlocks(torch.tensor([], dtype=torch.long), 8)
    with pytest.raises(ValueError, match="block_size"):
        D.PackedBlocks(torch.arange(100), 1)


def test_sampler_order_is_deterministic_and_resumable():
    blocks = D.PackedBlocks(torch.arange(10 * 4), 4)
    s = D.BlockSampler(blocks, batch_size=3, seed=5)
    first = [s.next_batch() for _ in range(7)]  # crosses two epochs of 3 batches (9 of 10 blocks)
    epoch0 = torch.cat(first[:3])[:, 0] // 4
    assert len(set(epoch0.tolist())) == 9  # no block twice within an epoch
    assert not torch.equal(torch.cat(first[:3]), torch.cat(first[3:6]))  # reshuffled per epoch
    assert s.position == 21 and s.epoch == 2
    again = D.BlockSampler(blocks, batch_size=3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, (again.next_batch() for _ in range(7))))
    # resume from a saved position: the same continuation
    state = D.BlockSampler(blocks, 3, seed=5, position=12).state_dict()
    resumed = D.BlockSampler(blocks, 3, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(a, b) for a, b in zip(first[4:], (resumed.next_batch() for _ in range(3))))
    other = D.BlockSampler(blocks, 3, seed=6)
    assert not torch.equal(other.next_batch(), first[0])
    with pytest.raises(ValueError, match="batch_size=3, seed=5"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size must be between 1 and the number of blocks"):
        D.BlockSampler(blocks, 11)
    plain = D.BlockSampler(blocks, 2, shuffle=False)
    assert torch.equal(next(iter(plain)), blocks.blocks[:2])


def test_build_blocks_end_to_end_and_short_source(tmp_path):
    f = tmp_path / "corpus.jsonl"
    f.write_text("\n".join(json.dumps({"text": CODE[i % 2][: 200 + i]}) for i in range(40)))
    blocks, tok = D.build_blocks(f, block_size=32, vocab_size=300)
    assert len(tok) == 300 and blocks.blocks.shape[1] == 32 and len(blocks) > 10
    assert blocks.blocks.max() < len(tok)
    val, tok2 = D.build_blocks(f, tok, block_size=8, split="validation", val_percent=20)
    assert tok2 is tok and len(val) > 0
    short = tmp_path / "short.txt"
    short.write_text("tiny text\n")
    with pytest.raises(ValueError, match=r"short\.txt\[all\]' has \d+ tokens, fewer than one block of 64"):
        D.build_blocks(short, tok, block_size=64, split="all")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.txt.*holds no text"):
        D.build_blocks(empty, tok, split="all")


def test_stdlib_blocks_train_a_tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    blocks, tok = D.build_blocks("stdlib", block_size=32, vocab_size=512, max_chars=150_000)
    val, _ = D.build_blocks("stdlib", tok, block_size=32, split="validation", max_chars=20_000)
    assert len(blocks) > 100 and len(val) > 10
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sampler = D.BlockSampler(blocks, 8, seed=0)
    with torch.no_grad():
        before = model(input_ids=val[:8], labels=val[:8]).loss.item()
    for batch in (sampler.next_batch() for _ in range(15)):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = model(input_ids=val[:8], labels=val[:8]).loss.item()
    assert after < before - 0.5
