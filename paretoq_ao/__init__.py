"""paretoq_ao: ParetoQ extremely-low-bit quantization (1, 1.58, 2, 3, 4 bits) as a torchao backend.

    from paretoq_ao import ParetoQQATConfig, ParetoQWeightOnlyConfig, quantize

    quantize(model, ParetoQQATConfig(bits=2))        # QAT: learnable scales, fake quantization
    ...train with any PyTorch loop...
    quantize(model, ParetoQWeightOnlyConfig(bits=2)) # pack codes at 2 bits; F.linear -> paretoq::linear

``quantize`` checks every selected layer before changing any and keeps the output head in full
precision; torchao's own ``quantize_(model, config)`` works too (see ``_targets`` and the README for
what a direct call guarantees).
"""

from .formats import ALLOWED_BITS, FORMATS, BitFormat, get_format
from .quant import dequantize_codes, fake_quantize, init_scale, quantize_codes, search_scale
from .packing import LAYOUT, pack_codes, unpack_codes
from .ops import linear, linear_8da
from .qat import ParetoQQATConfig, ParetoQQATWeight
from .packed import ParetoQPackedTensor, ParetoQWeightOnlyConfig, set_activations
from .size import LayerSize, SizeReport, model_size
from ._targets import default_filter, output_head_names, quantize, quantize_layers
from .serialization import atomic_write, load_safetensors, save, save_safetensors

__version__ = "0.1.0"

__all__ = [
    "ALLOWED_BITS", "FORMATS", "BitFormat", "get_format",
    "fake_quantize", "init_scale", "search_scale", "quantize_codes", "dequantize_codes",
    "LAYOUT", "pack_codes", "unpack_codes", "linear", "linear_8da",
    "ParetoQQATConfig", "ParetoQQATWeight", "ParetoQWeightOnlyConfig", "ParetoQPackedTensor", "set_activations",
    "LayerSize", "SizeReport", "model_size", "output_head_names", "quantize", "quantize_layers", "default_filter",
    "atomic_write", "save", "save_safetensors", "load_safetensors",
]
