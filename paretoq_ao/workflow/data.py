"""Text data for QAT: sources, a small offline tokenizer, fixed-length blocks with a resumable order.

Import it explicitly (``import paretoq_ao.data``); ``import paretoq_ao`` does not import it.

Sources (``load_texts(source, split)``):

* ``"stdlib"`` (the offline default): the Python standard library's own ``.py`` sources (code,
  comments and docstrings), found via ``sysconfig``; ``site-packages``, test folders and caches are
  skipped. Split by file: a file is in "validation" when ``crc32(relative path) % 100 <
  val_percent`` -- the same files every run and on every machine with the same Python.
* ``"fortunes"``: the English texts of Debian's ``fortunes`` package (fortune-mod's collection:
  quotations, literature, humour, definitions; ``apt-get install fortunes``), read from
  ``/usr/share/games/fortunes`` (or ``$PARETOQ_FORTUNES_DIR``): every data file except the ``.dat``
  indexes, the ``.u8`` links and ``ascii-art`` (pictures, not language); one text per fortune (the
  records between ``%`` lines). Real prose that no model here trains on: the second held-out corpus of
  ``benchmarks/pareto_study.py``. Split by fortune as for local files.
* a Hugging Face dataset name, e.g. ``"wikitext"`` (default config ``"wikitext-2-raw-v1"``), via
  ``datasets.load_dataset(name, config, split=split)``; empty rows are dropped.
* a local ``.txt`` file (documents separated by blank lines) or ``.jsonl`` file (one JSON object
  per line, its ``text_field``), or a folder of them (sorted). Split by document:
  ``crc32(document) % 100 < val_percent`` goes to "validation"; ``split="all"`` keeps everything.

Tokens: ``tokenize(texts, tokenizer)`` concatenates documents separated by the EOS token.
``train_tokenizer(texts, vocab_size)`` trains a byte-level BPE with ``tokenizers`` (offline,
deterministic) and wraps it as a ``transformers.PreTrainedTokenizerFast``, for models built from a
config.

Blocks: ``PackedBlocks(tokens, block_size)`` is a ``torch.utils.data.Dataset`` of non-overlapping
``block_size``-token windows (feed ``model(input_ids=b, labels=b)``: Hugging Face causal LMs shift the
labels themselves). ``BlockSampler`` yields batches in a seeded order (a fresh permutation per
epoch); its ``position`` (blocks consumed so far) is one integer to save and restore.
"""

from __future__ import annotations

import json
import os
import re
import sysconfig
import zlib
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "DEFAULT_DATASET", "DEFAULT_DATASET_CONFIG", "EOS_TOKEN",
    "load_texts", "stdlib_texts", "fortune_texts", "file_texts", "hf_dataset_texts",
    "train_tokenizer", "tokenize", "PackedBlocks", "BlockSampler", "build_blocks",
]

DEFAULT_DATASET = "wikitext"
DEFAULT_DATASET_CONFIG = "wikitext-2-raw-v1"
EOS_TOKEN = "<|endoftext|>"
VAL_PERCENT = 5
SPLITS = ("train", "validation", "all")
FORTUNES_DIR = "/usr/share/games/fortunes"
_FORTUNE_SKIP = {"ascii-art"}
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test", "lib2to3"}

PathLike = Union[str, os.PathLike]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _in_split(key: str, split: str, val_percent: int) -> bool:
    if split == "all":
        return True
    is_val = zlib.crc32(key.encode("utf-8", "surrogatepass")) % 100 < val_percent
    return is_val == (split == "validation")


# --------------------------------------------------------------------------- sources

def stdlib_texts(split: str = "train", val_percent: int = VAL_PERCENT, max_chars: Optional[int] = None,
                 root: Optional[PathLike] = None) -> List[str]:
    """The standard library's ``.py`` sources (one text per file) of ``split``, in sorted path order.

    ``max_chars`` stops once that many characters are collected (whole files; deterministic)."""
    _check_split(split)
    root = os.fspath(root or sysconfig.get_paths()["stdlib"])
    if not os.path.isdir(root):
        raise FileNotFoundError(f"stdlib_texts: the standard library folder {root!r} does not exist")
    out, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if not _in_split(rel, split, val_percent):
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue  # an odd file in the stdlib is not the user's problem
            if text.strip():
                out.append(text)
                total += len(text)
                if max_chars is not None and total >= max_chars:
                    return out
    return out


def fortune_texts(split: str = "all", val_percent: int = VAL_PERCENT, root: Optional[PathLike] = None) -> List[str]:
    """The fortunes of Debian's ``fortunes`` package (see the module docstring), in sorted file order."""
    _check_split(split)
    root = os.fspath(root or os.environ.get("PARETOQ_FORTUNES_DIR") or FORTUNES_DIR)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"fortune_texts: the fortunes folder {root!r} does not exist (Debian: "
                                "apt-get install fortunes; or set PARETOQ_FORTUNES_DIR)")
    out = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if "." in name or name in _FORTUNE_SKIP or os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            records = re.split(r"^%[ \t]*$", f.read(), flags=re.MULTILINE)
        texts = (r.strip("\n") for r in records)
        out += [t for t in texts if t.strip() and _in_split(t, split, val_percent)]
    if not out:
        raise ValueError(f"fortune_texts: no fortunes in {root!r} (split {split!r})")
    return out


def _read_local(path: str, text_field: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"data file {path!r} does not exist") from None
    except PermissionError:
        raise PermissionError(f"data file {path!r} cannot be read (permission denied)") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"data path {path!r} is a directory") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path!r} is not UTF-8 text: {e}") from None
    if path.endswith(".jsonl"):
        docs = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or text_field not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"{path}:{lineno}: no field {text_field!r} (has {keys}); pass text_field=")
            if not isinstance(obj[text_field], str):
                raise ValueError(f"{path}:{lineno}: field {text_field!r} is a {type(obj[text_field]).__name__}, "
                                 "not a string")
            docs.append(obj[text_field])
        return [d for d in docs if d.strip()]
    # .txt (or anything else read as text): documents separated by blank lines
    docs, cur = [], []
    for line in raw.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            docs.append("\n".join(cur))
            cur = []
    if cur:
        docs.append("\n".join(cur))
    return docs


def file_texts(path: PathLike, split: str = "all", text_field: str = "text",
               val_percent: int = VAL_PERCENT) -> List[str]:
    """Documents of a local ``.txt`` / ``.jsonl`` file, or of every such file in a folder (sorted)."""
    _check_split(split)
    path = os.fspath(path)
    if os.path.isdir(path):
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            raise PermissionError(f"data folder {path!r} cannot be read: {e.strerror}") from None
        files = [os.path.join(path, n) for n in names if n.endswith((".txt", ".jsonl"))]
        if not files:
            raise ValueError(f"data folder {path!r} holds no .txt or .jsonl files")
    elif not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    else:
        files = [path]
    docs = [d for f in files for d in _read_local(f, text_field)]
    return [d for d in docs if _in_split(d, split, val_percent)]


def hf_dataset_texts(name: str = DEFAULT_DATASET, config: Optional[str] = DEFAULT_DATASET_CONFIG,
                     split: str = "train", text_field: str = "text") -> List[str]:
    """Texts of a Hugging Face dataset (``datasets.load_dataset(name, config, split=split)``),
    empty rows dropped. Needs the dataset cached locally or network access."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types (DatasetNotFoundError, ConnectionError, ...)
        raise OSError(f"dataset {name!r} (config {config!r}, split {split!r}) could not be loaded locally "
                      f"or downloaded: {type(e).__name__}: {e}") from e
    columns = getattr(ds, "column_names", None)
    if columns is not None and text_field not in columns:
        raise ValueError(f"dataset {name!r} has no column {text_field!r} (columns: {columns}); pass text_field=")
    return [t for t in ds[text_field] if isinstance(t, str) and t.strip()]


def load_texts(source: Union[str, PathLike] = "stdlib", split: str = "train", *, text_field: str = "text",
               dataset_config: Optional[str] = None, val_percent: int = VAL_PERCENT,
               max_chars: Optional[int] = None) -> List[str]:
    """Texts of ``split`` from ``source``: "stdlib", "fortunes", a local file/folder, or a dataset name.

    A string that names an existing path, ends in .txt/.jsonl, or contains a path separator beyond
    "org/name" is treated as local; "stdlib" is the built-in offline corpus, "fortunes" the texts of
    Debian's fortunes package; anything else is a Hugging Face dataset (``dataset_config`` defaults
    to "wikitext-2-raw-v1" for "wikitext")."""
    _check_split(split)
    src = os.fspath(source)
    if src == "stdlib":
        texts = stdlib_texts(split, val_percent, max_chars=max_chars)
    elif src == "fortunes":
        texts = fortune_texts(split, val_percent)
    elif os.path.exists(src) or src.endswith((".txt", ".jsonl")) or src.startswith((".", "/", "~")) \
            or src.count("/") > 1:
        texts = file_texts(src, split, text_field, val_percent)
    else:
        if dataset_config is None and src == DEFAULT_DATASET:
            dataset_config = DEFAULT_DATASET_CONFIG
        texts = hf_dataset_texts(src, dataset_config, split if split != "all" else "train", text_field)
    if max_chars is not None and src != "stdlib":
        kept, total = [], 0
        for t in texts:
            if total >= max_chars:
                break
            kept.append(t)
            total += len(t)
        texts = kept
    return texts


# --------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: Sequence[str], vocab_size: int = 1024, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer offline; returns a ``PreTrainedTokenizerFast`` whose EOS,
    BOS and PAD token is ``<|endoftext|>`` (id 0). Same texts and size -> same tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not 257 <= vocab_size <= 1 << 20:
        raise ValueError(f"train_tokenizer: vocab_size must be at least 257 (256 bytes + EOS), got {vocab_size}")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer: no text to train on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=EOS_TOKEN, model_max_length=1 << 30)


def tokenize(texts: Sequence[str], tokenizer, add_eos: bool = True) -> torch.Tensor:
    """One 1-D int64 tensor: each text's ids followed by the EOS id (when the tokenizer has one)."""
    eos = getattr(tokenizer, "eos_token_id", None) if add_eos else None
    ids: List[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- blocks

class PackedBlocks(torch.utils.data.Dataset):
    """Non-overlapping ``block_size``-token windows of a token stream (the tail is dropped)."""

    def __init__(self, tokens: torch.Tensor, block_size: int, source: str = "<tokens>"):
        if not isinstance(block_size, int) or block_size < 2:
            raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        n = tokens.numel() // block_size
        if n == 0:
            raise ValueError(f"data source {source!r} has {tokens.numel()} tokens, fewer than one block of "
                             f"{block_size}; use more text or a smaller block_size")
        self.source = source
        self.block_size = block_size
        self.blocks = tokens[: n * block_size].view(n, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i) -> torch.Tensor:
        return self.blocks[i]

    def evenly_spaced(self, n: int) -> torch.Tensor:
        """``n`` blocks at evenly spaced positions over the whole stream (all of them when there are fewer):
        an evaluation sample that covers every part of a corpus, the same on every run."""
        if self.blocks.shape[0] <= n:
            return self.blocks
        return self.blocks[torch.linspace(0, self.blocks.shape[0] - 1, n).round().long()]


class BlockSampler:
    """Batches of blocks in a deterministic, resumable order.

    Epoch ``e`` visits the blocks in ``torch.randperm(len, generator=seed + e)`` order (or in order
    when ``shuffle=False``). ``position`` counts blocks consumed; ``state_dict()`` /
    ``load_state_dict()`` (or setting ``position``) resume exactly where a run stopped. Batches
    never straddle epochs: the last ``len % batch_size`` blocks of an epoch are skipped.

    Data parallel: with ``world_size`` > 1, ``batch_size`` is the global batch; rank ``r`` gets rows
    ``[r * b, (r + 1) * b)`` of each global batch, ``b = batch_size // world_size``. ``position``
    stays global, so the ranks together see exactly the single-process batches and a checkpoint
    resumes with any world size that divides ``batch_size``.
    """

    def __init__(self, blocks: PackedBlocks, batch_size: int, seed: int = 0, shuffle: bool = True,
                 position: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or batch_size > len(blocks):
            raise ValueError(f"batch_size must be between 1 and the number of blocks ({len(blocks)} in "
                             f"{blocks.source!r}), got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"BlockSampler: rank {rank} is not in [0, world_size={world_size})")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} (the global batch) is not divisible by the world size "
                             f"{world_size}: every rank must get the same number of blocks")
        self.blocks, self.batch_size, self.seed, self.shuffle = blocks, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.position = position
        self._perm_epoch, self._perm = None, None

    @property
    def per_epoch(self) -> int:
        return (len(self.blocks) // self.batch_size) * self.batch_size

    @property
    def epoch(self) -> int:
        return self.position // self.per_epoch

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            n = len(self.blocks)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perm = torch.randperm(n, generator=g)
            else:
                self._perm = torch.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def next_batch(self) -> torch.Tensor:
        if self.position % self.batch_size:
            raise ValueError(f"position {self.position} is not a multiple of batch_size {self.batch_size}")
        epoch, offset = divmod(self.position, self.per_epoch)
        idx = self._order(epoch)[offset: offset + self.batch_size]
        if self.world_size > 1:
            local = self.batch_size // self.world_size
            idx = idx[self.rank * local: (self.rank + 1) * local]
        self.position += self.batch_size
        return self.blocks.blocks[idx]

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("batch_size", self.batch_size) != self.batch_size or state.get("seed", self.seed) != self.seed:
            raise ValueError(f"BlockSampler state was saved with batch_size={state.get('batch_size')}, "
                             f"seed={state.get('seed')}; this sampler has batch_size={self.batch_size}, "
                             f"seed={self.seed}")
        self.position = int(state["position"])


def build_blocks(source: Union[str, PathLike] = "stdlib", tokenizer=None, block_size: int = 128,
                 split: str = "train", *, vocab_size: int = 1024, text_field: str = "text",
                 dataset_config: Optional[str] = None, max_chars: Optional[int] = None,
                 val_percent: int = VAL_PERCENT) -> Tuple[PackedBlocks, object]:
    """Load ``split`` of ``source``, tokenize it (training a BPE tokenizer on the *train* split when
    ``tokenizer`` is None) and pack it: returns ``(blocks, tokenizer)``."""
    kw = dict(text_field=text_field, dataset_config=dataset_config, max_chars=max_chars, val_percent=val_percent)
    texts = load_texts(source, split, **kw)
    if not texts:
        raise ValueError(f"data source {os.fspath(source)!r} (split {split!r}) holds no text")
    if tokenizer is None:
        tokenizer = train_tokenizer(texts if split == "train" else load_texts(source, "train", **kw), vocab_size)
    tokens = tokenize(texts, tokenizer)
    return PackedBlocks(tokens, block_size, source=f"{os.fspath(source)}[{split}]"), tokenizer
