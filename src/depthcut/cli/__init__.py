"""The `depthcut` command: `main` parses the arguments into a command's config and runs it
(`depthcut.cli.commands`); `depthcut.cli.main` holds the parser, the logging set-up and the exit codes.

Layer numbers are 0-based everywhere and blocks are half-open: `--layers 21:29` removes layers
21..28, and a best block [l, l+n) removes layers l..l+n-1.
"""

from depthcut.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
