"""The command an output was made by, for `depthcut replay` (docs/config-files.md): its name, its
arguments and every setting of its config, recorded while the command runs and written into each
provenance's `environment` (`depthcut.io.provenance.environment`).

It is held here for the run, not passed down: provenance is written deep inside each pipeline, which
takes a config but need not know that a command line made it (the Python API records no invocation)."""

from __future__ import annotations

import copy

INVOCATION_SCHEMA = "depthcut.invocation/1"

_current: dict | None = None


def record_invocation(command: str, argv: list[str], settings: dict) -> None:
    """Remember that `depthcut COMMAND` runs with `settings` (JSON values: every field of its config)."""
    global _current
    _current = {"schema": INVOCATION_SCHEMA, "command": command, "argv": list(argv),
                "settings": copy.deepcopy(settings)}


def clear_invocation() -> None:
    """Forget the command once it has run (a later Python API call made none)."""
    global _current
    _current = None


def current_invocation() -> dict | None:
    """The running command's record, or None outside the command line."""
    return copy.deepcopy(_current)
