"""``python -m engine.cli``: the ``onecard`` command line."""

import sys

from engine.cli import main

sys.exit(main())
