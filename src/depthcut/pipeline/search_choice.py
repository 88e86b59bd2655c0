"""`--search` as shrink and analyze read it, without torch: greedy, beam:K or none."""

from __future__ import annotations

import argparse

from depthcut.errors import DepthcutError, OptionValueError

SEARCHES = ("greedy", "beam:K", "none")


def search_width(text: str) -> int:
    """The partial cuts a search keeps at each step: greedy 1 (beam:1 is greedy), beam:K K, none 0;
    anything else is refused (beam:0, beam:x)."""
    if text in ("greedy", "none"):
        return 1 if text == "greedy" else 0
    name, _, width = str(text).partition(":")
    if name == "beam" and width.isdigit() and int(width) >= 1:
        return int(width)
    raise OptionValueError(f"--search must be greedy, beam:K (K >= 1 partial cuts kept a step) or none, got {text!r}")


def search_choice(text: str) -> str:
    """--search as the parser reads it: a bad value is one error line, at once."""
    try:
        search_width(text)
    except DepthcutError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text
