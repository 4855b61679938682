"""Saving packed models: safetensors (flattened packed tensors + JSON metadata) and atomic writes.

In a ``.safetensors`` file a packed weight ``<name>`` is stored as two plain tensors,
``<name>.qdata`` (uint8, the packing.py layout) and ``<name>.scale``, and described in the header
metadata entry ``paretoq_ao`` (JSON: {name: {"bits": ..., "shape": [N, K]}}, plus ``"activations": "int8"``
for layers set to int8 activations) together with the
layout name. ``torch.save`` / ``torch.load(weights_only=True)`` work directly on state dicts
holding ``ParetoQPackedTensor`` (the class is on torch's safe-globals list).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .formats import get_format
from .packed import ACTIVATIONS, ParetoQPackedTensor, packed_parts_problem
from .packing import LAYOUT, LEGACY_LAYOUTS, from_legacy

__all__ = ["atomic_write", "save", "save_safetensors", "load_safetensors", "remove_stale_temporaries", "temp_name",
           "SafetensorsFileError"]

METADATA_KEY = "paretoq_ao"  # the safetensors metadata entry describing packed tensors


def _new_file_mode(path: str) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


# Temporaries of every writer here are named ``.tmp-<host>+<pid>+<what>`` ('+' never occurs in a
# host name), so a later writer can tell its own from those of a dead process on this host.
_TEMP = re.compile(r"^\.tmp-(?P<host>[^+/]*)\+(?P<pid>\d+)\+")
# What earlier versions left (mkstemp names and ``.tmp-checkpoint-<step>-<pid>`` folders).
_LEGACY_CKPT = re.compile(r"^\.tmp-checkpoint-\d+-(?P<pid>\d+)$")


def temp_name(what: str) -> str:
    """The name of a temporary file or folder for ``what``, owned by this process."""
    return f".tmp-{socket.gethostname()}+{os.getpid()}+{what}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(directory: Union[str, os.PathLike]) -> List[str]:
    """Remove the temporaries that writers which died (killed during a save) left in
    ``directory``: entries named by ``temp_name`` whose process no longer runs on this host, and
    the ``.tmp-checkpoint-<step>-<pid>`` folders of earlier versions. Temporaries of live writers
    and of other hosts are kept. Returns the removed paths."""
    directory = os.fspath(directory)
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    host, removed = socket.gethostname(), []
    for name in names:
        m = _TEMP.match(name)
        dead = (m is not None and m["host"] == host and not _alive(int(m["pid"]))) or \
            ((m2 := _LEGACY_CKPT.match(name)) is not None and not _alive(int(m2["pid"])))
        if not dead:
            continue
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        removed.append(path)
    return removed


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then atomically rename onto ``path``; ``path`` is untouched on error.
    The file gets normal permissions: those of the file it replaces, else 0666 less the umask
    (``mkstemp`` alone would leave it readable by its owner only). Temporaries that killed writers
    left in the folder are removed first (``remove_stale_temporaries``)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(directory)
    fd, tmp = tempfile.mkstemp(prefix=temp_name(""), suffix="-" + os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _new_file_mode(path))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# How a failed write (a full disk, above all) reaches us: safetensors raises ``SafetensorError("Error
# while serializing: I/O error: No space left on device (os error 28)")``, torch.save a RuntimeError
# "[enforce fail at inline_container.cc:...] . unexpected pos 576 vs 534" that carries no errno.
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)|\bcode: (\d+)")
_SHORT_WRITE = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
_FULL_BELOW = 1 << 20  # bytes free in the folder below which a short write counts as a full disk


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def _write_error(e: BaseException, path: str) -> Optional[OSError]:
    """The one-line OSError naming ``path`` that the failed write ``e`` amounts to (errno ENOSPC for a
    full disk); None when ``e`` is no I/O failure (a pickling error...), which then propagates as is."""
    if not isinstance(e, (OSError, RuntimeError)) and type(e).__name__ != "SafetensorError":
        return None
    text = str(e)
    if isinstance(e, OSError) and e.errno:
        code = e.errno
    elif m := _OS_ERROR_CODE.search(text):
        code = int(m.group(1) or m.group(2))
    elif "No space left" in text:
        code = errno.ENOSPC
    elif any(s in text for s in _SHORT_WRITE):
        try:  # called while the partial temporary file still fills the disk
            full = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < _FULL_BELOW
        except OSError:
            full = False
        code = errno.ENOSPC if full else errno.EIO
    elif isinstance(e, OSError):
        return OSError(f"cannot save {path}: {_first_line(e)}; the previous file (if any) is unchanged")
    else:
        return None
    reason = os.strerror(code)
    detail = "" if reason in text else f" ({type(e).__name__}: {_first_line(e)})"
    return OSError(code, f"cannot save {path}: {reason}{detail}; the previous file (if any) is unchanged")


def _save_atomically(path, write: Callable[[str], None]) -> None:
    """``atomic_write`` whose I/O failures (full disk, unwritable folder...) are one-line OSErrors
    naming ``path``, not the temporary file or a writer's internals."""
    path = os.fspath(path)

    def guarded(tmp: str) -> None:
        try:
            write(tmp)
        except Exception as e:
            err = _write_error(e, path)
            if err is None:
                raise
            raise err from e

    try:
        atomic_write(path, guarded)
    except OSError as e:
        if e.filename in (None, path) and path in str(e):  # already names the file (not the temporary)
            raise
        raise (_write_error(e, path) or e) from e


def save(obj, path) -> None:
    """``torch.save`` written atomically (the previous file survives a failed or interrupted save;
    a full disk is an OSError with errno ENOSPC naming ``path``)."""
    _save_atomically(path, lambda tmp: torch.save(obj, tmp))


def _state_dict(obj) -> Mapping[str, torch.Tensor]:
    return obj.state_dict() if isinstance(obj, nn.Module) else obj


def flatten_packed(obj: Union[nn.Module, Mapping[str, torch.Tensor]]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The tensors and the metadata entry that ``save_safetensors`` writes for a model or state
    dict: a packed weight ``<name>`` becomes ``<name>.qdata`` / ``<name>.scale`` and is described
    (bits, shape, activations) under ``METADATA_KEY``; tensors are detached, aliases kept (the
    Hugging Face save path lets transformers deduplicate tied tensors)."""
    flat, described = {}, {}
    for name, t in _state_dict(obj).items():
        if isinstance(t, ParetoQPackedTensor):
            described[name] = {"bits": t.bits, "shape": list(t.shape)}
            if t.activations != "float":
                described[name]["activations"] = t.activations
            flat[f"{name}.qdata"], flat[f"{name}.scale"] = t.qdata.detach(), t.scale.detach()
        elif isinstance(t, torch.Tensor):
            flat[name] = t.detach()
        else:
            raise TypeError(f"save_safetensors: entry {name!r} is a {type(t).__name__}, not a tensor")
    return flat, {METADATA_KEY: json.dumps({"layout": LAYOUT, "tensors": described})}


def described_tensors(metadata: Optional[Mapping[str, str]]) -> Dict[str, dict]:
    """The packed-tensor descriptions of a safetensors header's metadata (``{}`` if there are none
    or they do not parse; ``load_safetensors`` is the strict reader)."""
    try:
        described = json.loads((metadata or {}).get(METADATA_KEY, "{}")).get("tensors", {})
    except (ValueError, AttributeError):
        return {}
    return described if isinstance(described, dict) else {}


def save_safetensors(obj: Union[nn.Module, Mapping[str, torch.Tensor]], path, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a model's (or a state dict's) tensors to ``path`` in safetensors format, atomically
    (a failed save leaves the previous file; a full disk is an OSError with errno ENOSPC naming ``path``)."""
    from safetensors.torch import save_file

    flat, ours = flatten_packed(obj)
    seen = set()
    for key, tensor in flat.items():
        # safetensors refuses aliased storage: tied tensors are written as separate copies.
        sid = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        flat[key] = tensor.clone().contiguous() if sid in seen else tensor.contiguous()
        seen.add(sid)
    meta = dict(metadata or {})
    meta.update({"format": "pt", **ours})
    _save_atomically(path, lambda tmp: save_file({k: v.cpu() for k, v in flat.items()}, tmp, metadata=meta))


class SafetensorsFileError(OSError, ValueError):
    """``load_safetensors``: the file is no safetensors file (truncated, garbage) or its packed tensors
    do not fit its metadata (shapes, dtypes, formats). An OSError (what callers reading files catch) and
    a ValueError; the message is one line naming the file, and the key where one is at fault."""


def _read_error(e: OSError, path: str) -> OSError:
    if os.path.isdir(path):  # safetensors says "No such device (os error 19)"
        return IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    code = e.errno
    if not code:
        m = _OS_ERROR_CODE.search(str(e))
        code = int(m.group(1) or m.group(2)) if m else (errno.ENOENT if isinstance(e, FileNotFoundError) else None)
    if code:
        return OSError(code, os.strerror(code), path)  # FileNotFoundError for ENOENT, and so on
    return type(e)(f"cannot read {path}: {_first_line(e)}")


def _packed_entries(path: str, meta: Mapping[str, str], flat: Mapping[str, torch.Tensor]) -> Dict[str, tuple]:
    """Validate the ``paretoq_ao`` metadata entry against the file's tensors: {name: (bits, shape,
    activations)} of every packed tensor, or a SafetensorsFileError naming the file and the key."""
    def bad(msg: str) -> SafetensorsFileError:
        return SafetensorsFileError(f"{path}: {msg}")

    raw = meta.get(METADATA_KEY)
    if raw is None:
        return {}  # a file of plain tensors
    try:
        info = json.loads(raw)
    except json.JSONDecodeError as e:
        raise bad(f"the {METADATA_KEY!r} metadata entry is not valid JSON ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("tensors"), dict) or "layout" not in info:
        got = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise bad(f"the {METADATA_KEY!r} metadata entry must be a JSON object with 'layout' and 'tensors' "
                  f"(an object), got {got}")
    legacy = info["layout"] in LEGACY_LAYOUTS
    if info["layout"] != LAYOUT and not legacy:
        raise bad(f"packed layout {info['layout']!r} is not one of the supported "
                  f"{', '.join(map(repr, (LAYOUT,) + LEGACY_LAYOUTS))}")
    entries = {}
    for name, d in info["tensors"].items():
        where = f"packed tensor {name!r}"
        if not isinstance(d, dict) or "bits" not in d or "shape" not in d:
            raise bad(f"{where}: its metadata {json.dumps(d)[:200]} lacks 'bits' or 'shape'")
        try:
            bits = get_format(d["bits"]).bits
        except ValueError as e:
            raise bad(f"{where}: {e}") from None
        shape = d["shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(x) is int and x >= 0 for x in shape)):
            raise bad(f"{where}: shape {json.dumps(shape)[:100]} is not [out_features, in_features]")
        act = d.get("activations", "float")
        if act not in ACTIVATIONS:
            raise bad(f"{where}: activations {act!r} is not one of {', '.join(map(repr, ACTIVATIONS))}")
        missing = [f"{name}.{part}" for part in ("qdata", "scale") if f"{name}.{part}" not in flat]
        if missing:
            raise bad(f"{where} is listed in the metadata but the file has no {' or '.join(map(repr, missing))}")
        if name in flat:
            raise bad(f"{where} is also stored as a plain tensor {name!r}")
        if legacy:  # ternary codes in 2-bit fields: repacked into the current layout
            try:
                flat[f"{name}.qdata"] = from_legacy(flat[f"{name}.qdata"], shape[1], bits)
            except ValueError as e:
                raise bad(f"{where}: {e}") from None
        problem = packed_parts_problem(flat[f"{name}.qdata"], flat[f"{name}.scale"], bits, shape)
        if problem is not None:
            raise bad(f"{where}: {problem}")
        entries[name] = (bits, torch.Size(shape), act)
    return entries


def load_safetensors(path, device: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    """Read a file written by ``save_safetensors`` back into a state dict with packed tensors.

    Every packed tensor is checked against its metadata (format, shape; qdata uint8 in the packed
    layout, scales [N, 1] or [N, K // group_size] in a float dtype): a truncated or garbage file or
    an inconsistent one raises ``SafetensorsFileError`` (an OSError and a ValueError) naming the file
    and the key; a file that cannot be opened, the OSError with its errno, naming the file."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise SafetensorsFileError(f"{path}: not a readable safetensors file (truncated or damaged?): "
                                   f"{_first_line(e)}") from None
    except OSError as e:
        raise _read_error(e, path) from None
    entries = _packed_entries(path, meta, flat)
    out = {}
    for name, (bits, shape, act) in entries.items():
        out[name] = ParetoQPackedTensor(flat.pop(f"{name}.qdata"), flat.pop(f"{name}.scale"), bits, shape, act)
    out.update(flat)
    return out
