"""QAT run checkpoints: RNG state, single-process and DCP checkpoints, ``latest``, resume checks,
the step log, and resolving a run folder to the model folder of its latest checkpoint."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from typing import Any, Dict, List, Optional

import torch

from .. import serialization
from .settings import CheckpointError, LATEST_NAME, QATRecipe, STATE_FORMAT, STATE_NAME

_log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- RNG state

def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- checkpoints

def latest_checkpoint(output_dir) -> Optional[str]:
    """The folder named by ``output_dir/latest`` (None when there is none)."""
    path = os.path.join(os.fspath(output_dir), LATEST_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        name = f.read().strip()
    ckpt = os.path.join(os.fspath(output_dir), name)
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"{path} names {name!r}, which does not exist")
    return ckpt


def _describe_diff(saved: Dict[str, Any], now: Dict[str, Any]) -> str:
    keys = sorted(set(saved) | set(now))
    diffs = [f"{k}={saved.get(k)!r} (this run: {now.get(k)!r})" for k in keys if saved.get(k) != now.get(k)]
    return ", ".join(diffs)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _save_checkpoint(output_dir: str, step: int, model, tokenizer, opt, sched, sampler, r: QATRecipe,
                     tokens_seen: int, extra: Optional[Dict[str, Any]] = None) -> str:
    from .hf import save_qat_checkpoint

    name = f"checkpoint-{step:08d}"
    final = os.path.join(output_dir, name)
    tmp = os.path.join(output_dir, serialization.temp_name(name))  # removed if this process dies
    state = {
        "format": STATE_FORMAT, "step": step, "tokens": tokens_seen, "settings": r.fingerprint(),
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "sampler": sampler.state_dict(),
        "rng": _rng_state(), **(extra or {}),
    }
    previous = latest_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    try:
        os.makedirs(tmp)
        save_qat_checkpoint(model, os.path.join(tmp, "model"), tokenizer)
        serialization.save(state, os.path.join(tmp, STATE_NAME))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        serialization.atomic_write(os.path.join(output_dir, LATEST_NAME), lambda p: _write_text(p, name + "\n"))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError):
            raise
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        kept = (f"the previous checkpoint {previous} is intact" if previous
                else "no earlier checkpoint exists")
        raise CheckpointError(f"could not save the checkpoint of step {step} in {output_dir}: {reason}; "
                              f"{kept}") from e
    # prune older checkpoints (after `latest` moved on)
    olds = sorted(n for n in os.listdir(output_dir) if n.startswith("checkpoint-") and n != name)
    for n in olds[: max(0, len(olds) - (r.keep_last - 1))]:
        shutil.rmtree(os.path.join(output_dir, n), ignore_errors=True)
    return final


def _read_state(ckpt: str) -> Dict[str, Any]:
    path = os.path.join(ckpt, STATE_NAME)
    try:
        state = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"cannot read the trainer state {path}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a paretoq recipe checkpoint")
    return state


def _check_settings(ckpt: str, state: Dict[str, Any], r: QATRecipe) -> None:
    saved, now = state["settings"], r.fingerprint()
    if saved != now:
        raise CheckpointError(f"checkpoint {ckpt} was made with other settings: {_describe_diff(saved, now)}; "
                              "use the same settings to resume, or another output_dir")


def _load_model_state(model, ckpt: str) -> None:
    from ..serialization import load_safetensors

    path = os.path.join(ckpt, "model", "model.safetensors")
    try:
        sd = load_safetensors(path)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    try:
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt} does not match the model: {str(e).splitlines()[0]}") from None


def _failure_reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        return "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: (exception, traceback)}
    if isinstance(failures, dict) and failures:
        return "; ".join(f"rank {rank}: {_failure_reason(exc[0] if isinstance(exc, tuple) else exc)}"
                         for rank, exc in sorted(failures.items()))
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _is_comm_error(e: BaseException) -> bool:
    """A collective failed: a peer died, or hung past ``dist_timeout`` (gloo reports both as plain
    RuntimeErrors, NCCL as DistBackendError)."""
    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e)
    return any(k in text for k in ("gloo", "NCCL", "Timed out", "Connection closed", "Connection reset"))


def _dcp_errors():
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)  # CheckpointException derives from BaseException


def _dcp_state(model, opt) -> Dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def _save_checkpoint_dcp(output_dir: str, step: int, model, tokenizer, opt, sched, sampler, r: QATRecipe,
                         tokens_seen: int, world_size: int, extra: Optional[Dict[str, Any]] = None) -> str:
    """A checkpoint written with ``torch.distributed.checkpoint`` by every rank (see the module doc).

    Built in ``.tmp-checkpoint-<step>/``; rank 0 renames it into place and only then rewrites
    ``latest``, after every rank's shards are on disk. A rank that fails (or a crash) at any point
    leaves the previous checkpoint and ``latest`` as they were; a failure is raised on every rank."""
    from .distributed import all_ok, dcp_save, from_main, world_info
    from .hf import DCP_DIR, save_qat_metadata

    main = world_info().is_main
    name = f"checkpoint-{step:08d}"
    final = os.path.join(output_dir, name)
    tmp = from_main(os.path.join(output_dir, serialization.temp_name(name)))  # named after rank 0's process
    previous, err = None, None
    if main:
        try:
            previous = latest_checkpoint(output_dir) if os.path.isdir(output_dir) else None
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except (OSError, CheckpointError) as e:
            err = e
    ok = all_ok(err is None)
    if ok:
        try:
            dcp_save(_dcp_state(model, opt), os.path.join(tmp, DCP_DIR))
        except _dcp_errors() as e:  # DCP raises (its CheckpointException) on every rank when one fails
            err = e
        ok = all_ok(err is None)
    if ok and main:
        state = {
            "format": STATE_FORMAT, "step": step, "tokens": tokens_seen, "settings": r.fingerprint(),
            "checkpoint_format": "dcp", "world_size": world_size,
            "scheduler": sched.state_dict(), "sampler": sampler.state_dict(), "rng": _rng_state(),
            **(extra or {}),
        }
        try:
            save_qat_metadata(model, os.path.join(tmp, "model"), tokenizer)
            serialization.save(state, os.path.join(tmp, STATE_NAME))
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            serialization.atomic_write(os.path.join(output_dir, LATEST_NAME),
                                       lambda p: _write_text(p, name + "\n"))
        except OSError as e:
            err = e
    if ok:
        ok = all_ok(err is None)
    if not ok:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = _failure_reason(err) if err is not None else "another rank failed to write its part"
        kept = (f"the previous checkpoint {previous} is intact" if previous else
                "the previous checkpoint (if any) is intact") if main else "the previous checkpoint is intact"
        raise CheckpointError(f"could not save the checkpoint of step {step} in {output_dir}: {reason}; "
                              f"{kept}") from err
    if main:
        olds = sorted(n for n in os.listdir(output_dir) if n.startswith("checkpoint-") and n != name)
        for n in olds[: max(0, len(olds) - (r.keep_last - 1))]:
            shutil.rmtree(os.path.join(output_dir, n), ignore_errors=True)
    return final


def _check_layer_formats(model, ckpt: str) -> None:
    from .hf import QAT_NAME, qat_modules

    path = os.path.join(ckpt, "model", QAT_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f).get("modules", {})
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    now = qat_modules(model)
    for name in sorted(set(saved) | set(now)):
        if saved.get(name) != now.get(name):
            raise CheckpointError(f"checkpoint {ckpt} layer {name!r} is {saved.get(name)} but this model's is "
                                  f"{now.get(name)}")


def _load_checkpoint(model, opt, ckpt: str, state: Dict[str, Any], sharded: bool) -> None:
    """Model and optimizer state from ``ckpt``, whichever format it has, into a plain or FSDP model."""
    from .hf import DCP_DIR

    dcp_dir = os.path.join(ckpt, DCP_DIR)
    if os.path.isdir(dcp_dir):
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from .distributed import dcp_load

        _check_layer_formats(model, ckpt)
        sd = _dcp_state(model, opt)
        try:
            dcp_load(sd, dcp_dir)
        except _dcp_errors() as e:
            raise CheckpointError(f"cannot load the sharded checkpoint {dcp_dir}: {_failure_reason(e)}") from e
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        return
    if not sharded:
        _load_model_state(model, ckpt)
        opt.load_state_dict(state["optimizer"])
        return
    # a single-process checkpoint (full tensors) resumed on several ranks: each rank keeps its shard
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from ..serialization import load_safetensors

    path = os.path.join(ckpt, "model", "model.safetensors")
    try:
        msd = load_safetensors(path)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    full = StateDictOptions(full_state_dict=True)
    try:
        set_model_state_dict(model, msd, options=full)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {ckpt} does not match the model: {str(e).splitlines()[0]}") from None
    names = [n for n, _ in model.named_parameters()]
    osd = state["optimizer"]
    fqn_osd = {"state": {names[i]: v for i, v in osd["state"].items()},
               "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in osd["param_groups"]]}
    set_optimizer_state_dict(model, opt, fqn_osd, options=full)


# --------------------------------------------------------------------------- log

class _Log:
    def __init__(self, path: Optional[str]):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            # a crash mid-line leaves a partial line: start on a fresh one
            if os.path.exists(path) and os.path.getsize(path):
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    last = f.read(1)
                if last != b"\n":
                    with open(path, "a", encoding="utf-8") as f:
                        f.write("\n")

    def write(self, record: Dict[str, Any]) -> None:
        if not self.path:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_log(path) -> List[Dict[str, Any]]:
    """Step records of a log.jsonl, in step order, the last record of each step (a run resumed from
    an earlier checkpoint re-logs the steps after it); unreadable lines are skipped."""
    by_step: Dict[int, Dict[str, Any]] = {}
    with open(os.fspath(path), encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "step" in rec and "loss" in rec:
                by_step[int(rec["step"])] = rec
    return [by_step[k] for k in sorted(by_step)]




def resolve_qat_checkpoint(path) -> str:
    """A QAT model folder from: a run's output_dir (its latest checkpoint), a checkpoint-N folder,
    or a folder written by ``hf.save_qat_checkpoint``."""
    from .hf import QAT_NAME

    p = os.fspath(path)
    if not os.path.exists(p):
        raise CheckpointError(f"no such checkpoint folder {p!r}")
    if os.path.isfile(os.path.join(p, QAT_NAME)):
        return p
    if os.path.isfile(os.path.join(p, "model", QAT_NAME)):
        return os.path.join(p, "model")
    latest = latest_checkpoint(p) if os.path.isdir(p) else None
    if latest and os.path.isfile(os.path.join(latest, "model", QAT_NAME)):
        return os.path.join(latest, "model")
    raise CheckpointError(f"{p!r} is not a ParetoQ QAT checkpoint (no {QAT_NAME}, no checkpoint-*/ named by "
                          f"'{LATEST_NAME}')")


def is_qat_folder(path) -> bool:
    """True for a folder that holds QAT state rather than packed weights: a QAT model folder, a
    checkpoint-N folder or a run's output_dir (``latest``)."""
    from .hf import QAT_NAME

    p = os.fspath(path)
    return os.path.isdir(p) and any(os.path.isfile(os.path.join(p, *n))
                                    for n in ((QAT_NAME,), ("model", QAT_NAME), (LATEST_NAME,)))


def resolve_model_dir(path) -> str:
    """A ``paretoq qat`` output folder or one of its checkpoint-N folders -> the model folder of its
    (latest) checkpoint; any other path unchanged (what ``paretoq eval`` / ``size`` accept)."""
    p = os.fspath(path)
    marks = (os.path.join(p, LATEST_NAME), os.path.join(p, STATE_NAME))
    if os.path.isdir(p) and any(os.path.isfile(m) for m in marks):
        return resolve_qat_checkpoint(p)
    return p
