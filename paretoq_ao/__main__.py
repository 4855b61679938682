"""``python -m paretoq_ao ...`` runs the ``paretoq`` command line (see ``paretoq_ao.cli``)."""

import sys

from .cli import main

sys.exit(main())
