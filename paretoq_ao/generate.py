"""Old name of ``paretoq_ao.workflow.generate``: the same module object (kept for existing imports)."""

import sys

from .workflow import generate as _module

sys.modules[__name__] = _module
