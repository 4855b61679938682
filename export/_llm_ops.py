"""ExecuTorch's LLM kernels (``llama::update_cache``, ``llama::custom_sdpa``) that the KV-cache
decode step of ``export/llama.py`` is exported with: whether they load here. Importing
``executorch.extension.llm.custom_ops`` registers both their PyTorch ops (for export) and their
ExecuTorch runtime kernels (for ``load_executorch``)."""
from __future__ import annotations

import torch

__all__ = ["custom_ops_available"]


def custom_ops_available() -> bool:
    """Whether ``torch.ops.llama.custom_sdpa`` / ``update_cache`` and their kernels load here."""
    try:
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    except (ImportError, OSError):
        return False
    return hasattr(torch.ops.llama, "custom_sdpa") and hasattr(torch.ops.llama, "update_cache")
