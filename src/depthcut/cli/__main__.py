"""`python -m depthcut.cli`: the `depthcut` command."""

import sys

from depthcut.cli.main import main

sys.exit(main())
