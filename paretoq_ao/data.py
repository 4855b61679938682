"""Old name of ``paretoq_ao.workflow.data``: the same module object (kept for existing imports)."""

import sys

from .workflow import data as _module

sys.modules[__name__] = _module
