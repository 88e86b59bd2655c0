"""What a command does around its output besides writing it (`depthcut.io.atomic` and
`depthcut.io.claims` do that): a free-space check before any work, signals that stop a command the
way Ctrl-C does, and the provenance written beside an output.

`handle_signals` makes SIGTERM and SIGHUP interrupt like Ctrl-C (a `Terminated`, which is a
`KeyboardInterrupt`), so the same clean-up runs; a publish in progress finishes first.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.io.signals import defer_signal


def check_free_space(out: str | Path, needed: int, what: str = "the output") -> None:
    """Fail before any work when the disk that will hold `out` has less than `needed` bytes free."""
    parent = Path(out).absolute().parent
    while not parent.exists():
        parent = parent.parent
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if free < needed:
        raise DepthcutError(f"{what} needs about {needed / 2**20:,.1f} MiB, but the disk holding {parent} has "
                            f"{free / 2**20:,.1f} MiB free; free some space or choose another --out")



# --- signals ----------------------------------------------------------------------------------

class Terminated(KeyboardInterrupt):
    """A signal (SIGINT, SIGTERM, SIGHUP) asked the command to stop: the clean-up of Ctrl-C runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _SignalState:
    count = 0


_SIGNALS = _SignalState()
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _on_signal(signum, frame) -> None:
    if defer_signal(signum):  # a publish is in progress: handled again when it is done
        return
    _SIGNALS.count += 1
    if _SIGNALS.count == 1:
        raise Terminated(signum)
    if _SIGNALS.count == 2:  # the first one's clean-up is running: let it finish
        print("depthcut: cleaning up; send the signal again to stop at once", file=sys.stderr)
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextmanager
def handle_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise `Terminated` in the block (from the main thread only: Python
    allows handlers nowhere else); the previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _on_signal) for signum in HANDLED_SIGNALS}
    _SIGNALS.count = 0
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- provenance -------------------------------------------------------------------------------

def environment() -> dict:
    """Versions of what produced an output, for provenance."""
    import torch
    import transformers

    from depthcut import __version__

    return {
        "depthcut": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
