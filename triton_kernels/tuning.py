"""Config selection for ``triton_linear``: candidate sets, pruner, autotune cache, warmup.

Paths (by M, the number of activation rows):

* ``gemv``  M == 1: ``_gemv_kernel`` and (word-aligned rows) ``_gemv_words_kernel`` configs,
  split-K 1..16; the untuned default is the word GEMV where it applies;
* ``small`` 2 <= M <= 64: ``_gemm_kernel`` with BLOCK_M 16..64 and split-K 1..8, plus both GEMV
  kernels' configs (one program row per activation row) while M <= 4;
* ``large`` M > 64: ``_gemm_kernel`` tensor-core tiles, no split-K, grouped program order.

Every tl.dot config with BLOCK_K >= 32 has a "gemmw" twin (the same tiles reading word units);
the untuned defaults use the word kernels where the rows are whole words.

With narrow scale groups (group size not a multiple of 64, e.g. 16 or 32) the candidate sets use
K tiles of 16/32 so that a tile stays inside one group (one scale per row per tile).

The autotune key is ``(path, M bucket, N, K, bits, groups, x dtype, out dtype, fp32 dot precision,
deterministic flag, device name)`` with M bucket = 1 for M == 1, else the next power of two
(capped at 1024). Candidates are pruned per shape (``prune``): tiles wider than the padded shape,
tl.dot tiles < 16 (illegal on GPU), more K splits than K tiles, split-K when
``torch.are_deterministic_algorithms_enabled()``, too many split-K programs, tiles whose software
pipeline would not fit in shared memory; with group scales, configs whose K tile lies inside one
group are kept in preference to per-element scale gathers. Each surviving config is timed with
``triton.testing.do_bench`` (which flushes L2 between repetitions) on the real arguments, through
the full launcher (so the zero-fill and cast of split-K are part of the time); configs that fail
to compile are skipped. The winner is cached per key for the life of the process.

No benchmarking happens (``default_config`` is used) under ``TRITON_INTERPRET=1`` (one fixed
config per path), with ``PARETOQ_TRITON_AUTOTUNE=0``, or while a CUDA graph is being captured
(with a warning; call ``warmup`` before capture so that the tuned configs are cached).

Tuned configs can be kept as files: ``save_configs(path)`` writes the cache as JSON
(``paretoq-triton-configs-v1``: one entry per key, fields ``KEY_FIELDS``, and the config), and
``load_configs(path)`` reads it back. Before its first lookup on a device, a process loads the
files shipped in ``configs/`` that list that device name, then the files named by
``$PARETOQ_TRITON_CONFIGS``, so a deployment can skip autotuning.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import replace
from typing import Callable, Dict, Iterable, List, Optional

import torch
import triton

from .problem import GEMV_MAX_M, KernelConfig, Problem, interpreting, scale_mode, word_gemm_ok, word_kernel_ok

GEMM_KINDS = ("gemm", "gemmw")

__all__ = [
    "path_of", "m_bucket", "tuning_key", "candidate_configs", "prune", "default_config",
    "get_config", "tuned_configs", "clear_cache", "save_configs",
    "load_configs", "KEY_FIELDS",
]

_CACHE: Dict[tuple, KernelConfig] = {}
_WARNED: set = set()


def _np2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def path_of(M: int) -> str:
    return "gemv" if M == 1 else ("small" if M <= 64 else "large")


def m_bucket(M: int) -> int:
    return 1 if M <= 1 else min(_np2(M), 1024)


def _deterministic() -> bool:
    return bool(torch.are_deterministic_algorithms_enabled())


KEY_FIELDS = ("path", "m_bucket", "N", "K", "bits", "groups", "x_dtype", "out_dtype",
              "dot_precision", "deterministic", "word_aligned", "device")


def tuning_key(problem: Problem) -> tuple:
    """The autotune cache key (fields ``KEY_FIELDS``)."""
    return (
        path_of(problem.M), m_bucket(problem.M), problem.N, problem.K, problem.bits,
        problem.groups, str(problem.x_dtype), str(problem.out_dtype), problem.dot_precision,
        _deterministic(), bool(problem.word_aligned), problem.device,
    )


# ---------------------------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------------------------


def _narrow_groups(problem: Optional[Problem]) -> bool:
    """Group scales whose groups are narrower than the usual K tiles (e.g. 16 or 32 columns)."""
    return problem is not None and problem.groups > 1 and problem.group_size % 64 != 0


def _gemv_candidates(splits=(1, 2, 4, 8, 16), problem: Optional[Problem] = None):
    out = []
    tiles = [(16, 256), (32, 128), (32, 256), (64, 64), (64, 128)]
    if _narrow_groups(problem):
        tiles += [(64, 32), (128, 32), (128, 16)]
    for bn, bk in tiles:
        for sk in splits:
            out.append(KernelConfig("gemv", block_n=bn, block_k=bk, split_k=sk,
                                    num_warps=4 if bn * bk <= 4096 else 8, num_stages=2))
    return out


def _word_candidates(splits=(1, 2, 4, 8, 16)) -> List[KernelConfig]:
    """Word-GEMV tiles: BLOCK_N x BLOCK_K large enough that each thread owns several rows (the
    activations it loads are reused across them) and several words (16-byte loads)."""
    tiles = [(64, 256, 4), (128, 256, 4), (64, 512, 4), (128, 128, 4), (256, 128, 8),
             (256, 64, 4), (256, 256, 8), (128, 64, 4)]
    return [KernelConfig("gemvw", block_n=bn, block_k=bk, split_k=sk, num_warps=w, num_stages=2)
            for bn, bk, w in tiles for sk in splits]


def _with_word_twins(cfgs: List[KernelConfig]) -> List[KernelConfig]:
    """Each tl.dot config followed by its "gemmw" twin (same tiles, words in) where BLOCK_K >= 32."""
    out = []
    for c in cfgs:
        out.append(c)
        if c.kind == "gemm" and c.block_k >= 32:
            out.append(replace(c, kind="gemmw"))
    return out


def _small_candidates(M: int, problem: Optional[Problem] = None) -> List[KernelConfig]:
    out = []
    bm_max = max(16, min(64, _np2(M)))
    bks = (16, 32) if _narrow_groups(problem) else (64, 128)
    for bm in sorted({16, bm_max}):
        for bn in (32, 64, 128):
            for bk in bks:
                for sk in (1, 2, 4, 8):
                    out.append(KernelConfig("gemm", block_m=bm, block_n=bn, block_k=bk, split_k=sk,
                                            group_m=8, num_warps=4, num_stages=3))
    out = _with_word_twins(out)
    if M <= 4:
        out += _gemv_candidates(splits=(1, 2, 4, 8), problem=problem)
        out += _word_candidates(splits=(1, 2, 4, 8))
    return out


def _large_candidates(problem: Optional[Problem] = None) -> List[KernelConfig]:
    if _narrow_groups(problem):
        tiles = [(128, 128, 32, 4, 4), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 64, 32, 4, 4),
                 (64, 256, 32, 4, 4), (128, 128, 16, 4, 4), (64, 128, 16, 4, 4)]
        return _with_word_twins([
            KernelConfig("gemm", block_m=bm, block_n=bn, block_k=bk, split_k=1, group_m=8,
                         num_warps=w, num_stages=s) for bm, bn, bk, w, s in tiles])
    tiles = [
        # BM, BN, BK, warps, stages
        (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
        (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 256, 32, 4, 4),
        (128, 128, 128, 8, 2), (64, 128, 128, 4, 3),
    ]
    return _with_word_twins([
        KernelConfig("gemm", block_m=bm, block_n=bn, block_k=bk, split_k=1, group_m=8,
                     num_warps=w, num_stages=s) for bm, bn, bk, w, s in tiles])


def candidate_configs(problem: Problem) -> List[KernelConfig]:
    """Every config of the problem's path, before pruning (a single one under the interpreter)."""
    if interpreting():
        return [default_config(problem)]
    path = path_of(problem.M)
    if path == "gemv":
        return _gemv_candidates(problem=problem) + _word_candidates()
    if path == "small":
        return _small_candidates(problem.M, problem)
    return _large_candidates(problem)


def _smem_estimate(problem: Problem, cfg: KernelConfig) -> int:
    """Bytes of shared memory the software pipeline of ``_gemm_kernel`` needs (upper estimate)."""
    if cfg.kind not in GEMM_KINDS:
        return 0
    xb = torch.empty((), dtype=problem.x_dtype).element_size()
    w_bytes = cfg.block_n * cfg.block_k * (2 if problem.code_bits == 3 else 1)
    s_bytes = cfg.block_n * cfg.block_k * 4 if scale_mode(problem, cfg) == 2 else 0
    return cfg.num_stages * (cfg.block_m * cfg.block_k * xb + w_bytes + s_bytes)


def prune(configs: Iterable[KernelConfig], problem: Problem) -> List[KernelConfig]:
    """Drop configs illegal or pointless for the shape; never returns an empty list."""
    M, N, K = problem.M, problem.N, problem.K
    det = _deterministic()
    keep = []
    for c in configs:
        if c.kind in GEMM_KINDS and min(c.block_m, c.block_n, c.block_k) < 16:
            continue  # tl.dot does not compile below 16 on GPU
        if c.kind == "gemmw" and not word_gemm_ok(problem, c):
            continue
        if c.kind == "gemv" and M > GEMV_MAX_M:
            continue
        if c.kind == "gemvw" and not word_kernel_ok(problem, c):
            continue
        if c.block_k > max(16, _np2(K)) or c.block_n > max(16, _np2(N)):
            continue
        if c.kind in GEMM_KINDS and c.block_m > max(16, _np2(M)):
            continue
        k_tiles = triton.cdiv(K, c.block_k)
        if c.split_k > 1:
            if det or c.split_k > k_tiles:
                continue
            m_tiles = triton.cdiv(M, c.block_m) if c.kind in GEMM_KINDS else M
            if m_tiles * triton.cdiv(N, c.block_n) * c.split_k > 8 * max(1, problem.num_sms):
                continue  # enough programs without this many splits
        if problem.smem_bytes and _smem_estimate(problem, c) > problem.smem_bytes:
            continue
        keep.append(c)
    if problem.groups > 1:
        aligned = [c for c in keep if scale_mode(problem, c) == 1]
        if aligned:
            keep = aligned
    return keep or [default_config(problem)]


def _pick_block_k(problem: Problem, prefer: int, lo: int = 16) -> int:
    cap = max(lo, _np2(problem.K))
    prefer = min(prefer, cap)
    if problem.groups > 1:
        bk = prefer
        while bk >= lo:
            if problem.group_size % bk == 0:
                return bk
            bk //= 2
    return prefer


def _pick_split(problem: Problem, tiles: int, block_k: int, max_split: int) -> int:
    if _deterministic() or interpreting():
        return 1
    target = 2 * max(1, problem.num_sms)
    split = 1
    k_tiles = triton.cdiv(problem.K, block_k)
    while tiles * split < target and split * 2 <= min(max_split, k_tiles):
        split *= 2
    return split


def default_config(problem: Problem) -> KernelConfig:
    """A legal config from simple rules (no benchmarking)."""
    M, N = problem.M, problem.N
    path = path_of(M)
    if interpreting():
        # One small config per path; split-K is exercised (clamped by split_plan when K is short).
        if path == "gemv":
            words = KernelConfig("gemvw", block_n=16, block_k=64, split_k=2)
            if word_kernel_ok(problem, words):
                return words
            return KernelConfig("gemv", block_n=16, block_k=32, split_k=2)
        if path == "small":
            cfg = KernelConfig("gemm", block_m=16, block_n=16, block_k=32, split_k=2, group_m=2)
        else:
            cfg = KernelConfig("gemm", block_m=32, block_n=32, block_k=32, split_k=1, group_m=2)
        return _prefer_words(problem, cfg)
    if path == "gemv":
        # The word GEMV where it applies (fewer instructions per code, no shared memory in the
        # loop; see linear.py), with a tile of 128 rows x 256 columns or the group size.
        bk = _pick_block_k(problem, 256, lo=32)
        words = KernelConfig("gemvw", block_n=128 if N >= 4096 else 64, block_k=bk, num_warps=4)
        if word_kernel_ok(problem, words):
            sk = _pick_split(problem, triton.cdiv(N, words.block_n), bk, 16)
            return replace(words, split_k=sk)
        bn = 32 if N >= 2048 else 16
        bk = _pick_block_k(problem, 128)
        sk = _pick_split(problem, triton.cdiv(N, bn), bk, 16)
        return KernelConfig("gemv", block_n=bn, block_k=bk, split_k=sk, num_warps=4)
    if path == "small":
        bm = max(16, min(64, _np2(M)))
        bn = 64
        bk = _pick_block_k(problem, 128)
        sk = _pick_split(problem, triton.cdiv(M, bm) * triton.cdiv(N, bn), bk, 8)
        return _prefer_words(problem, KernelConfig(
            "gemm", block_m=bm, block_n=bn, block_k=bk, split_k=sk, group_m=8, num_warps=4,
            num_stages=3))
    bk = _pick_block_k(problem, 64)
    return _prefer_words(problem, KernelConfig(
        "gemm", block_m=128, block_n=128, block_k=bk, split_k=1, group_m=8, num_warps=8,
        num_stages=3))


def _prefer_words(problem: Problem, cfg: KernelConfig) -> KernelConfig:
    """The "gemmw" twin of a tl.dot config where it applies (its decode takes about half the
    instructions per code, see linear.py), else the config itself."""
    twin = replace(cfg, kind="gemmw")
    return twin if cfg.block_k >= 32 and word_gemm_ok(problem, twin) else cfg


# ---------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------


def _autotune_enabled() -> bool:
    return os.environ.get("PARETOQ_TRITON_AUTOTUNE", "1") not in ("0", "", "false", "False")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def get_config(problem: Problem, run: Callable[[KernelConfig], object]) -> KernelConfig:
    """The cached config for the problem's key (after loading the config files, see
    ``load_configs``), tuning with ``run(config)`` on a miss."""
    _autoload(problem.device)
    key = tuning_key(problem)
    cfg = _CACHE.get(key)
    if cfg is not None:
        return cfg
    if interpreting() or not _autotune_enabled():
        cfg = default_config(problem)
        _CACHE[key] = cfg
        return cfg
    if _capturing():
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"triton_linear: no tuned config for {key} during CUDA graph capture; using the "
                "default config (call paretoq_ao.triton_kernels.warmup(...) before capturing)",
                stacklevel=3,
            )
        return default_config(problem)  # not cached: a later eager call may still tune
    cfg = _tune(problem, run)
    _CACHE[key] = cfg
    return cfg


def _tune(problem: Problem, run) -> KernelConfig:
    from triton.testing import do_bench

    cands = prune(candidate_configs(problem), problem)
    if len(cands) == 1:
        return cands[0]
    best, best_t, last_err = None, math.inf, None
    for cfg in cands:
        try:
            t = do_bench(lambda: run(cfg), warmup=5, rep=20)
        except Exception as e:  # noqa: BLE001 - out of resources / compile failure: skip config
            last_err = e
            continue
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        warnings.warn(f"triton_linear: every candidate config failed ({last_err!r}); "
                      "using the default config", stacklevel=3)
        return default_config(problem)
    return best


def tuned_configs() -> Dict[tuple, KernelConfig]:
    """A copy of the autotune cache: key -> chosen config."""
    return dict(_CACHE)


def clear_cache() -> None:
    """Forget every chosen config (the config files are read again on the next call)."""
    _CACHE.clear()
    _WARNED.clear()
    _AUTOLOADED.clear()


# ---------------------------------------------------------------------------------------------
# Tuned configs as files
# ---------------------------------------------------------------------------------------------

CONFIGS_FORMAT = "paretoq-triton-configs-v1"
CONFIGS_ENV = "PARETOQ_TRITON_CONFIGS"
SHIPPED_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_AUTOLOADED: set = set()


def save_configs(path, device: Optional[str] = None) -> int:
    """Write the autotune cache (only ``device``'s entries when given) to ``path`` as JSON,
    atomically; returns the number of entries. Load it with ``load_configs`` or through
    ``$PARETOQ_TRITON_CONFIGS`` to skip autotuning in a later process."""
    import json

    import triton as _triton

    from paretoq_ao.serialization import atomic_write

    entries = []
    for key, cfg in sorted(_CACHE.items(), key=lambda kv: repr(kv[0])):
        k = dict(zip(KEY_FIELDS, key))
        if device is not None and k["device"] != device:
            continue
        entries.append({"key": k, "config": dict(vars(cfg))})
    devices = sorted({e["key"]["device"] for e in entries})
    doc = {"format": CONFIGS_FORMAT, "triton": _triton.__version__, "devices": devices,
           "entries": entries}

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")

    atomic_write(path, write)
    return len(entries)


def _read_configs(path) -> dict:
    """The JSON document of a ``save_configs`` file (ValueError if it is not one)."""
    import json

    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"tuned-config file {path}: not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != CONFIGS_FORMAT:
        raise ValueError(f"tuned-config file {path}: expected format {CONFIGS_FORMAT!r}, got "
                         f"{doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r}")
    return doc


def load_configs(path, override: bool = False) -> int:
    """Add the entries of a ``save_configs`` file to the autotune cache; returns how many were
    added. Entries already in the cache are kept unless ``override``. The whole file is checked
    before anything is added: a malformed file raises ValueError naming the file and the entry."""
    path = os.fspath(path)
    return _add_configs(_read_configs(path), path, override)


def _add_configs(doc: dict, path: str, override: bool) -> int:
    parsed = []
    for i, entry in enumerate(doc.get("entries", [])):
        try:
            k = entry["key"]
            missing = [f for f in KEY_FIELDS if f not in k]
            if missing:
                raise KeyError(f"key fields {missing}")
            key = tuple(k[f] for f in KEY_FIELDS)
            cfg = KernelConfig.from_any(entry["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"tuned-config file {path}: entry {i} is invalid: {e}") from None
        parsed.append((key, cfg))
    added = 0
    for key, cfg in parsed:
        if override or key not in _CACHE:
            _CACHE[key] = cfg
            added += 1
    return added


def _autoload(device: str) -> None:
    """Once per device name and process: the shipped files of ``configs/`` that list the device,
    then the files of ``$PARETOQ_TRITON_CONFIGS`` (``os.pathsep``-separated; they override)."""
    if device in _AUTOLOADED:
        return
    _AUTOLOADED.add(device)
    import glob

    for path in sorted(glob.glob(os.path.join(SHIPPED_CONFIGS_DIR, "*.json"))):
        try:
            doc = _read_configs(path)
        except (OSError, ValueError):
            warnings.warn(f"triton_linear: unreadable shipped config file {path}; ignored",
                          stacklevel=3)
            continue
        if device in doc.get("devices", []):
            _add_configs(doc, path, override=False)
    for path in filter(None, os.environ.get(CONFIGS_ENV, "").split(os.pathsep)):
        load_configs(path, override=True)
