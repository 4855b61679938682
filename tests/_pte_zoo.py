"""Every packed format x scale layout side by side in one model, exported once per activation mode
and weight order for the whole test session (the ``pte_zoo`` fixture in conftest.py).

Exporting a program costs seconds of fixed work (torch.export, edge lowering, serialisation) on top
of a little per layer, so the tests that compare a ``.pte`` with its eager model (test_export,
test_blocked16) share four programs of 45 packed layers instead of exporting one small model per
case. Each branch is one (bits, layout) case and returns three tensors:

* ``a = l1(x[:, :k])``: one packed Linear (k -> hidden, with bias) on the raw input, so that a NaN
  or Inf in a token reaches the kernel's dot product directly;
* ``b = l2(relu(a))``: hidden -> 19 rows without bias (19: one whole 16-row block and a padded one);
* ``c = l3(relu(a))``: hidden -> 1 (N = 1).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
from torchao import quantize_

from paretoq_ao import ParetoQWeightOnlyConfig

BITS = (1, 1.58, 2, 3, 4)
# (group_size, k, hidden): per row; groups of 20 that end mid-SIMD-chunk; groups of 32 on a shorter row
LAYOUTS = ((None, 200, 37), (20, 200, 40), (32, 160, 64))
K = max(k for _, k, _ in LAYOUTS)
CASES = tuple(itertools.product(BITS, LAYOUTS))
LAYERS_PER_CASE = 3


def case_id(bits, group_size) -> str:
    return f"{bits}-{'row' if group_size is None else f'g{group_size}'}"


class _Branch(nn.Module):
    def __init__(self, k, hidden):
        super().__init__()
        self.k = k
        self.l1 = nn.Linear(k, hidden)
        self.l2 = nn.Linear(hidden, 19, bias=False)
        self.l3 = nn.Linear(hidden, 1)

    def forward(self, x):
        a = self.l1(x[:, : self.k])
        h = torch.relu(a)
        return a, self.l2(h), self.l3(h)


class Zoo(nn.Module):
    """``forward(x)`` (x: batch x K) -> a flat tuple, three tensors per case in ``CASES`` order."""

    def __init__(self):
        super().__init__()
        self.branches = nn.ModuleDict()
        for bits, (group_size, k, hidden) in CASES:
            branch = _Branch(k, hidden)
            quantize_(branch, ParetoQWeightOnlyConfig(bits=bits, group_size=group_size),
                      filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear))
            self.branches[case_id(bits, group_size).replace(".", "_")] = branch

    def forward(self, x):
        return tuple(t for branch in self.branches.values() for t in branch(x))

    def outputs(self, flat, bits, group_size):
        """The three outputs ``(a, b, c)`` of one case, out of a flat tuple that forward returned."""
        i = [case_id(b, g) for b, (g, _, _) in CASES].index(case_id(bits, group_size))
        return flat[LAYERS_PER_CASE * i: LAYERS_PER_CASE * (i + 1)]

    def branch(self, bits, group_size) -> nn.Module:
        """The eager module of one case: ``branch(x)`` equals ``outputs(self(x), bits, group_size)``."""
        return self.branches[case_id(bits, group_size).replace(".", "_")]


def make_zoo() -> Zoo:
    torch.manual_seed(0)
    return Zoo().eval()


class PteZoo:
    """The eager zoo and its programs, exported on first use into ``directory``."""

    def __init__(self, directory):
        self.directory = directory
        self.model = make_zoo()
        self._paths = {}

    def path(self, activations: str, weight_order: str = "blocked16") -> str:
        import paretoq_ao.export as pe

        key = (activations, weight_order)
        if key not in self._paths:
            batch = torch.export.Dim("batch", min=1, max=16)
            self._paths[key] = pe.export_executorch(
                self.model, (torch.randn(2, K),), self.directory / f"zoo-{activations}-{weight_order}.pte",
                dynamic_shapes=({0: batch},), activations=activations, weight_order=weight_order)
        return self._paths[key]
