"""``python -m kizuna``: the ``kizuna`` command line (how the runtime starts its own processes)."""

import sys

from kizuna.cli.main import main

sys.exit(main())
