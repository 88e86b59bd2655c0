"""Signals during a publish: a handler that calls `defer_signal` does not cut a publish (or the
release of claims) short; the signal is handled when it is done."""

from __future__ import annotations

import signal
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
