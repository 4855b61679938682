"""Old name of ``paretoq_ao.workflow.distributed``: the same module object (kept for existing imports)."""

import sys

from .workflow import distributed as _module

sys.modules[__name__] = _module
