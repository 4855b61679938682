"""Which layers a ParetoQ config converts, validated before any layer is changed.

The explicit entry point is ``quantize(model, config, filter_fn=None, device=None)`` (exported as
``paretoq_ao.quantize``; the recipe, the CLI and the Hugging Face paths use it). It selects the layers
the way torchao's traversal does (``filter_fn(module, fqn)``; a selected module's children are not
visited), keeps the output head in full precision under the default filter, checks every selected
layer -- and that no selected weight is tied to a module left out -- and raises one error naming
every bad layer before any layer changes. Then it runs torchao's public ``quantize_`` on exactly
the planned layers, with the plan active in a context variable so a weight shared by several
layers is converted once, and finally runs the ``after_quantize`` hooks.

A direct ``torchao.quantization.quantize_(model, config)`` reaches the same handler one module at a
time. The handler then looks for that call through ``_torchao_call`` (quantize_'s public signature
only) and, when it finds it, plans the whole call the same way, once. Where it cannot (a torchao
whose ``quantize_`` signature differs -- with a warning --, ``FqnToConfig``, or the handler called
directly), it validates and converts the one module it is given.
"""

from __future__ import annotations

import contextvars
import logging
import weakref
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from . import _torchao_call

log = logging.getLogger("paretoq_ao")

# Last path components that name an output head in common model code.
_HEAD_NAMES = {"lm_head", "output"}


def default_filter(module: nn.Module, fqn: str) -> bool:
    """The layers ``paretoq_ao.quantize`` selects when no ``filter_fn`` is given: every
    ``nn.Linear`` (the output head is then kept in full precision)."""
    return isinstance(module, nn.Linear)


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


_PLANS: Dict[int, _Plan] = {}  # direct quantize_ calls in progress: id(frame) -> plan
_AFTER: List[Callable[[nn.Module], None]] = []


def after_quantize(fn: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """Register ``fn(model)``, called when ``quantize`` (or a direct ``quantize_`` call it recognises)
    with a ParetoQ config has converted every layer it selected (the workflow's Hugging Face hook uses
    it so that ``save_pretrained`` knows the model is quantized; packages can also announce hooks as
    entry points of the group ``paretoq_ao.after_quantize``)."""
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


@dataclass
class _Scheme:
    problems: Callable  # config -> (module -> [problem, ...])
    apply: Callable  # config -> (module, fqn, memo -> None)


_SCHEMES: Dict[type, _Scheme] = {}


def register_scheme(config_type: type, problems: Callable, apply: Callable) -> None:
    """Called by each ParetoQ config's module: how to check a target layer and how to convert it."""
    _SCHEMES[config_type] = _Scheme(problems, apply)


def _scheme(config) -> _Scheme:
    scheme = _SCHEMES.get(type(config))
    if scheme is None:
        known = ", ".join(sorted(t.__name__ for t in _SCHEMES))
        raise TypeError(f"paretoq_ao.quantize: config must be one of {known}, got {type(config).__name__}; "
                        "apply other torchao configs with torchao's quantize_")
    return scheme


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("paretoq_ao_plan", default=None)


def quantize(model: nn.Module, config, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
             device=None) -> nn.Module:
    """Apply a ParetoQ config to ``model`` in place and return it.

    ``filter_fn(module, fqn)`` selects the layers (default: every ``nn.Linear``, the output head
    kept in full precision). Every selected layer is checked first; one ``ValueError`` names every
    bad layer and nothing is changed. ``device`` is torchao's: where the selected layers are moved.
    """
    _check_model(model)
    plan, bad = _plan(model, config, filter_fn, default_filter, _scheme(config).problems(config))
    if bad:
        raise ValueError(_message(config, bad))
    _apply_plan(model, plan, device)
    _finished(model)
    return model


def quantize_layers(model: nn.Module, layer_configs: Mapping[str, object], device=None) -> nn.Module:
    """Apply a ParetoQ config per named layer (``{fqn: config}``; layers sharing a config object are
    converted by one call), checking every layer of every config before any changes. Used to
    rebuild a model whose layers were saved with their own bits / group sizes."""
    _check_model(model)
    named = dict(model.named_modules())
    unknown = [n for n in layer_configs if n not in named]
    if unknown:
        raise ValueError(f"paretoq_ao.quantize_layers: the model has no layer(s) {unknown[:5]}")
    groups: Dict[int, Tuple[object, set]] = {}
    for fqn, config in layer_configs.items():
        groups.setdefault(id(config), (config, set()))[1].add(fqn)
    plans, bad = [], []
    for config, names in groups.values():
        plan, errs = _plan(model, config, lambda m, fqn, s=names: fqn in s, default_filter,
                           _scheme(config).problems(config))
        plans.append(plan)
        bad += errs
    if bad:
        raise ValueError(_message(plans[0].config, bad))
    for plan in plans:
        _apply_plan(model, plan, device)
    _finished(model)
    return model


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"paretoq_ao.quantize: model must be a torch.nn.Module, got {type(model).__name__}")


def _apply_plan(model: nn.Module, plan: _Plan, device) -> None:
    """Run torchao's public quantize_ on exactly the planned layers, the plan active."""
    from torchao.quantization import quantize_

    wanted = {fqn for fqn, convert, _ in plan.todo.values() if convert}
    token = _ACTIVE.set(plan)
    try:
        quantize_(model, plan.config, filter_fn=lambda mod, fqn: fqn in wanted, device=device)
    finally:
        _ACTIVE.reset(token)
    left = [fqn for fqn, convert, _ in plan.todo.values() if convert]
    if left:
        raise RuntimeError(f"paretoq_ao.quantize: torchao's quantize_ did not visit {left[:5]} "
                           f"({len(left)} planned layer(s) left unconverted)")


def run(module: nn.Module, config) -> nn.Module:
    """Handler body shared by the configs: execute the active plan, or plan the direct quantize_
    call once, or (no call found) check and convert this one module."""
    scheme = _scheme(config)
    plan = _ACTIVE.get()
    if plan is not None and plan.config is config and id(module) in plan.todo:
        _execute(plan, module, scheme.apply(config))
        return module
    call = _torchao_call.find_call(config)
    if call is None:
        errs = scheme.problems(config)(module)
        if errs:
            raise ValueError(_message(config, [("<module>", module, errs)], whole_model=False))
        scheme.apply(config)(module, "", {})
        return module

    plan = _PLANS.get(call.frame_id)
    if plan is None or plan.model() is not call.model or plan.config is not config or id(module) not in plan.todo:
        plan = _make_plan(call.model, config, call.filter_fn, call.default_filter, scheme.problems(config))
        _PLANS[call.frame_id] = plan
    try:
        _execute(plan, module, scheme.apply(config))
    except BaseException:
        _PLANS.pop(call.frame_id, None)
        raise
    if not plan.todo:
        _PLANS.pop(call.frame_id, None)
        _finished(call.model)
    return module


def _execute(plan: _Plan, module: nn.Module, apply: Callable) -> None:
    entry = plan.todo[id(module)]
    fqn, convert, visits = entry
    entry[1], entry[2] = False, visits - 1  # later visits of a shared module: nothing to do
    if entry[2] == 0:
        del plan.todo[id(module)]
    if convert:
        apply(module, fqn, plan.memo)


def _make_plan(model, config, filter_fn, default, problems) -> _Plan:
    plan, bad = _plan(model, config, filter_fn, default, problems)
    if bad:
        raise ValueError(_message(config, bad))
    return plan


def _plan(model, config, filter_fn, default, problems) -> Tuple[_Plan, list]:
    """The plan of one call and its bad layers ``[(fqn, module, [problem, ...]), ...]``."""
    filter_fn = filter_fn or default
    selected = _select(model, filter_fn)
    heads = output_head_names(model) if filter_fn is default else set()
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
    return _Plan(model=weakref.ref(model), config=config, todo=todo), bad


def _message(config, bad, whole_model: bool = True) -> str:
    head = (f"{type(config).__name__} cannot be applied; no layer was changed:" if whole_model else
            f"{type(config).__name__} cannot be applied to this layer (layers converted before it stay converted):")
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
