"""``python -m bench <workload>``: see bench.cli."""

import sys

from bench.cli import main

sys.exit(main())
