"""Which layers a ``quantize_`` call converts, validated before any layer is changed.

torchao's ``quantize_`` calls our handler once per selected module and never shows it the whole
model. To (a) validate every target before the first one is modified and (b) keep the output head
in full precision under torchao's default filter, the handler looks up the ``quantize_`` call that
invoked it (its frame holds ``model``, ``config`` and ``filter_fn``), plans the whole call once,
and then executes the plan one module at a time. Called any other way (directly, or through
torchao's ``FqnToConfig``) the handler validates and converts the module it is given.
"""

from __future__ import annotations

import logging
import sys
import weakref
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

log = logging.getLogger("paretoq_ao")

# Last path components that name an output head in common model code.
_HEAD_NAMES = {"lm_head", "output"}


def _quantize_code():
    from torchao.quantization import quant_api

    return quant_api.quantize_.__code__, quant_api._is_linear


def _find_quantize_call(config):
    code, default_filter = _quantize_code()
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            loc = frame.f_locals
            if loc.get("config") is config:
                return frame, loc["model"], loc.get("filter_fn"), default_filter
            return None
        frame = frame.f_back
    return None


def output_head_names(model: nn.Module) -> set:
    """Fully qualified names of the Linear layers that act as the model's output head."""
    heads = set()
    named = dict(model.named_modules())
    ids = {id(m): n for n, m in named.items()}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if out is not None and id(out) in ids:
            heads.add(ids[id(out)])
    emb_weights = {id(m.weight) for m in named.values() if isinstance(m, nn.Embedding)}
    for name, m in named.items():
        if isinstance(m, nn.Linear) and (
            id(m.weight) in emb_weights or name.rsplit(".", 1)[-1] in _HEAD_NAMES
        ):
            heads.add(name)
    return heads


def _select(model: nn.Module, filter_fn: Callable) -> List[Tuple[str, nn.Module]]:
    """The modules torchao's traversal hands to the handler, in its order (a module registered
    under several parents is visited once per parent)."""
    chosen = []

    def visit(mod, fqn):
        if filter_fn(mod, fqn):
            chosen.append((fqn, mod))
            return
        for name, child in mod.named_children():
            visit(child, f"{fqn}.{name}" if fqn else name)

    visit(model, "")
    return chosen


def describe(module: nn.Module) -> str:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return type(module).__name__
    return f"{type(module).__name__} with weight {tuple(w.shape)}"


@dataclass
class _Plan:
    model: "weakref.ref"
    config: object
    todo: Dict[int, list]  # id(module) -> [fqn, convert it?, visits left]
    memo: dict = field(default_factory=dict)  # shared (tied) weights: id(old) -> new


_PLANS: Dict[int, _Plan] = {}
_AFTER: List[Callable[[nn.Module], None]] = []


def after_quantize(fn: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """Register ``fn(model)``, called when a ``quantize_`` call with a ParetoQ config has converted
    every layer it selected (the workflow's Hugging Face hook uses it so that ``save_pretrained``
    knows the model is quantized; packages can also announce hooks as entry points of the group
    ``paretoq_ao.after_quantize``)."""
    if fn not in _AFTER:
        _AFTER.append(fn)
    return fn


_HOOK_GROUP = "paretoq_ao.after_quantize"  # entry points: workflow hooks, loaded on first use
_HOOKS_LOADED = False


def _load_hook_entry_points() -> None:
    """Register the ``after_quantize`` hooks that installed packages announce (pyproject.toml:
    the Hugging Face hook of the workflow wing), so the core names no workflow module."""
    global _HOOKS_LOADED
    if _HOOKS_LOADED:
        return
    _HOOKS_LOADED = True
    for ep in entry_points(group=_HOOK_GROUP):
        after_quantize(ep.load())


def _finished(model: nn.Module) -> None:
    _load_hook_entry_points()
    for fn in list(_AFTER):
        fn(model)


def run(
    module: nn.Module,
    config,
    problems: Callable[[nn.Module], List[str]],
    apply: Callable[[nn.Module, str, dict], None],
) -> nn.Module:
    """Handler body shared by the configs: plan (once per quantize_ call), check, apply."""
    call = _find_quantize_call(config)
    if call is None:
        errs = problems(module)
        if errs:
            raise ValueError(_message(config, [("<module>", module, errs)]))
        apply(module, "", {})
        return module

    frame, model, filter_fn, default_filter = call
    key = id(frame)
    plan = _PLANS.get(key)
    if plan is None or plan.model() is not model or plan.config is not config or id(module) not in plan.todo:
        plan = _make_plan(model, config, filter_fn, default_filter, problems)
        _PLANS[key] = plan
    entry = plan.todo[id(module)]
    fqn, convert, visits = entry
    entry[1], entry[2] = False, visits - 1  # later visits of a shared module: nothing to do
    if entry[2] == 0:
        del plan.todo[id(module)]
    try:
        if convert:
            apply(module, fqn, plan.memo)
    except BaseException:
        _PLANS.pop(key, None)
        raise
    if not plan.todo:
        _PLANS.pop(key, None)
        _finished(model)
    return module


def _make_plan(model, config, filter_fn, default_filter, problems) -> _Plan:
    filter_fn = filter_fn or default_filter
    selected = _select(model, filter_fn)
    heads = output_head_names(model) if filter_fn is default_filter else set()
    selected_ids = {id(mod) for _, mod in selected}
    users = {}  # id(weight) -> names of the modules that hold it
    for name, mod in model.named_modules():
        w = mod._parameters.get("weight")
        if w is not None:
            users.setdefault(id(w), []).append((name, mod))
    todo, bad = {}, []
    for fqn, mod in selected:
        if id(mod) in todo:
            todo[id(mod)][2] += 1
            continue
        if fqn in heads:
            log.info("paretoq_ao: keeping output head %r (%s) in full precision; pass a filter_fn "
                     "to quantize it", fqn, describe(mod))
            todo[id(mod)] = [fqn, False, 1]
            continue
        errs = problems(mod)
        w = mod._parameters.get("weight")
        tied = [n for n, m in users.get(id(w), []) if id(m) not in selected_ids]
        if tied and not errs:
            errs = [f"its weight is tied to {', '.join(map(repr, tied))}, which this call does not "
                    "quantize; untie the weights or leave this layer out (filter_fn)"]
        if errs:
            bad.append((fqn or "<model>", mod, errs))
        todo[id(mod)] = [fqn, True, 1]
    if bad:
        raise ValueError(_message(config, bad))
    return _Plan(model=weakref.ref(model), config=config, todo=todo)


def _message(config, bad) -> str:
    head = f"{type(config).__name__} cannot be applied; no layer was changed:"
    lines = [f"layer {fqn!r} ({describe(mod)}): {e}" for fqn, mod, errs in bad for e in errs]
    if len(lines) == 1:  # one problem: one line
        return f"{head} {lines[0]}"
    return "\n  ".join([head] + lines)


def common_problems(module: nn.Module, group_size: Optional[int]) -> List[str]:
    """Checks every ParetoQ config makes on a target layer."""
    if not isinstance(module, nn.Linear):
        kind = type(module)
        return [f"only nn.Linear layers can be quantized (this is a {kind.__module__}.{kind.__qualname__}); "
                "leave it out of filter_fn"]
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return ["ParetoQ quantizes 2-D linear weights (nn.Linear); this module has none"]
    if not w.dtype.is_floating_point:
        return [f"weight dtype {w.dtype} is not floating point"]
    errs = []
    if group_size is not None and w.shape[1] % group_size:
        errs.append(f"group_size={group_size} does not divide in_features={w.shape[1]}")
    return errs


def nonfinite_problem(w: torch.Tensor) -> List[str]:
    if w.is_meta:  # no values yet (a model built on the meta device): nothing to check
        return []
    finite = torch.isfinite(w.detach())
    if bool(finite.all()):
        return []
    bad = int((~finite).sum())
    return [f"weight holds {bad} NaN/Inf value(s)"]
