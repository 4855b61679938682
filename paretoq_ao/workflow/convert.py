"""QAT checkpoint -> packed model (``paretoq convert``)."""

from __future__ import annotations

import logging
from typing import Dict

from torch import nn

from .checkpoints import resolve_qat_checkpoint
from .settings import RecipeError

_log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- convert

def to_packed(model: nn.Module) -> nn.Module:
    """Convert every QAT layer of ``model`` in place to packed weights at its own bits/group size."""
    from torchao import quantize_

    from .hf import qat_modules
    from ..packed import ParetoQWeightOnlyConfig

    groups: Dict[tuple, set] = {}
    for name, fmt in qat_modules(model).items():
        groups.setdefault((fmt["bits"], fmt["group_size"]), set()).add(name)
    if not groups:
        raise RecipeError("the model has no ParetoQ QAT layers to convert")
    for (bits, gs), names in groups.items():
        quantize_(model, ParetoQWeightOnlyConfig(bits=bits, group_size=gs),
                  filter_fn=lambda m, fqn, s=names: fqn in s)
    return model


def convert_checkpoint(src, out_dir) -> nn.Module:
    """QAT checkpoint (see ``resolve_qat_checkpoint``) -> packed Hugging Face folder ``out_dir``."""
    from .hf import load_qat_checkpoint, save_quantized

    folder = resolve_qat_checkpoint(src)
    model, tok = load_qat_checkpoint(folder)
    to_packed(model)
    model.eval()
    save_quantized(model, tok, out_dir)
    return model
