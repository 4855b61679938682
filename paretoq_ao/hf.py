"""Old name of ``paretoq_ao.workflow.hf``: the same module object (kept for existing imports)."""

import sys

from .workflow import hf as _module

sys.modules[__name__] = _module
