"""``python -m paretoq_ao ...`` runs the ``paretoq`` command line (see ``paretoq_ao.workflow.cli``)."""

import sys

from .workflow.cli import main

sys.exit(main())
