"""Old name of ``paretoq_ao.workflow.cli``: the same module object (kept for existing imports)."""

import sys

from .workflow import cli as _module

sys.modules[__name__] = _module
