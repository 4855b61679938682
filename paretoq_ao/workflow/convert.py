"""QAT checkpoint -> packed model (``paretoq convert``)."""

from __future__ import annotations

import logging
from torch import nn

from .checkpoints import resolve_qat_checkpoint
from .settings import RecipeError

_log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- convert

def to_packed(model: nn.Module) -> nn.Module:
    """Convert every QAT layer of ``model`` in place to packed weights at its own bits/group size."""
    from .hf import layer_configs, qat_modules
    from .._targets import quantize_layers
    from ..packed import ParetoQWeightOnlyConfig

    mods = qat_modules(model)
    if not mods:
        raise RecipeError("the model has no ParetoQ QAT layers to convert")
    return quantize_layers(model, layer_configs(mods, ParetoQWeightOnlyConfig))


def convert_checkpoint(src, out_dir) -> nn.Module:
    """QAT checkpoint (see ``resolve_qat_checkpoint``) -> packed Hugging Face folder ``out_dir``."""
    from .hf import load_qat_checkpoint, save_quantized

    folder = resolve_qat_checkpoint(src)
    model, tok = load_qat_checkpoint(folder)
    to_packed(model)
    model.eval()
    save_quantized(model, tok, out_dir)
    return model
