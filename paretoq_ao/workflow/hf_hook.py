"""The ``after_quantize`` hook of the Hugging Face integration, kept apart from ``hf`` so that the
core can load it (entry point ``paretoq_ao.after_quantize``) without importing transformers: only
when transformers is already loaded -- so the model in hand may be a ``PreTrainedModel`` -- does it
import ``hf_quantizer`` and mark the model quantized for ``save_pretrained``."""

import sys


def mark_quantized(model) -> None:
    if "transformers" not in sys.modules:  # no Hugging Face model can be in hand
        return
    from .hf_quantizer import _track_quantize_root

    _track_quantize_root(model)
