"""Signals: SIGINT, SIGTERM and SIGHUP stop a command the way Ctrl-C does (`handle_signals`), and
during a publish a handler that calls `defer_signal` does not cut a publish (or the
release of claims) short; the signal is handled when it is done."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _Publishing:
    depth = 0  # > 0 while publishing or releasing claims
    pending: int | None = None  # a signal that arrived meanwhile, handled when the last one ends


_PUBLISHING = _Publishing()


def defer_signal(signum: int) -> bool:
    """For a signal handler: True when a publish is in progress, and the signal is then handled (by
    the handler installed for it) as soon as the publish is done; False otherwise."""
    if not _PUBLISHING.depth:
        return False
    _PUBLISHING.pending = _PUBLISHING.pending or signum
    return True


@contextmanager
def critical() -> Iterator[None]:
    """A block that a signal does not cut short: the signal takes effect when it ends."""
    _PUBLISHING.depth += 1
    try:
        yield
    finally:
        _PUBLISHING.depth -= 1
    if not _PUBLISHING.depth and _PUBLISHING.pending is not None:
        signum, _PUBLISHING.pending = _PUBLISHING.pending, None
        handler = signal.getsignal(signum)
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)


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
