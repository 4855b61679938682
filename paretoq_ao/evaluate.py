"""Old name of ``paretoq_ao.workflow.evaluate``: the same module object (kept for existing imports)."""

import sys

from .workflow import evaluate as _module

sys.modules[__name__] = _module
