"""Old name of ``paretoq_ao.workflow.example``: the same module object (kept for existing imports)."""

import sys

from .workflow import example as _module

if __name__ == "__main__":  # python -m paretoq_ao.example
    _module.main()
else:
    sys.modules[__name__] = _module
