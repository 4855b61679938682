"""Old name of ``paretoq_ao.workflow.recipe``: the same module object (kept for existing imports)."""

import sys

from .workflow import recipe as _module

sys.modules[__name__] = _module
