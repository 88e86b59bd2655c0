"""depthcut's messages: what it is doing (`loading ...`, `pruning ... shard by shard`), notes and
warnings, through `logging` under the `depthcut` logger.

Like transformers, depthcut gives its logger a handler of its own, so that a notebook sees the same
lines as the command line without configuring logging: INFO and above to the `sys.stderr` of the
moment, plain lines, `warning: ` before warnings. `logging.getLogger("depthcut").setLevel(...)`
changes it; the command line's `-v` and `-q` call `configure`.
"""

from __future__ import annotations

import logging
import sys


class StderrHandler(logging.StreamHandler):
    """Writes to the `sys.stderr` of the moment (a test's capture, a redirected notebook), not the one
    that was current when the handler was made."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class PlainFormatter(logging.Formatter):
    """Progress notes as plain lines; `warning: ...` above them; the logger's name at debug level."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        if record.levelno <= logging.DEBUG:
            return f"debug: {record.name}: {message}"
        return message


def configure(verbose: int = 0, quiet: bool = False) -> None:
    """depthcut's level: INFO by default, WARNING with `quiet`, DEBUG with `verbose` (and every
    library's DEBUG messages too with `verbose` >= 2)."""
    logger = logging.getLogger("depthcut")
    if not any(isinstance(handler, StderrHandler) for handler in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(PlainFormatter())
        logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    if verbose >= 2:
        logging.basicConfig(level=logging.DEBUG, format="debug: %(name)s: %(message)s")
