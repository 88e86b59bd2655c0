"""Text files as depthcut reads them: strict UTF-8 (a leading byte-order mark dropped), errors that
name the file, line and column, and JSON Lines with line-numbered errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from depthcut.errors import DepthcutError


def read_utf8(path: Path) -> str:
    """The text of `path`, decoded as UTF-8 (a leading byte-order mark is dropped): the one decoding
    policy of every text format depthcut reads. Bytes that are not UTF-8, or a NUL byte (binary
    data), are an error naming the file, line and column; nothing is replaced silently."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        raise _not_text(path, data.count(b"\n", 0, error.start) + 1, data[line_start:], error.start - line_start)
    if "\x00" in text:
        offset = data.index(b"\x00")
        line_start = data.rfind(b"\n", 0, offset) + 1
        raise _not_text(path, data.count(b"\n", 0, offset) + 1, data[line_start:], offset - line_start)
    return text


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based number, text) of each line of `path`, decoded as `read_utf8` decodes, one line in
    memory at a time."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise _not_text(path, number, raw, error.start) from None
            if "\x00" in line:
                raise _not_text(path, number, raw, raw.index(b"\x00"))
            yield number, line


def _not_text(path: Path, line: int, raw: bytes, column: int) -> DepthcutError:
    """The error for the byte at 0-based `column` of the line `raw`, which is not UTF-8 text."""
    if raw[column:column + 1] == b"\x00":
        return DepthcutError(f"{path}:{line}: a NUL byte at column {column + 1}: binary data, not text")
    return DepthcutError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[column]:02x} at column {column + 1}); "
                         "depthcut reads text data as UTF-8: convert it first (e.g. iconv -f latin1 -t utf-8)")


def read_jsonl(path: Path, text: str | None = None) -> tuple[list[dict], list[int]]:
    """The records of a JSON Lines file and their 1-based line numbers (blank lines skipped), read
    one line at a time (or from `text`, the file's already decoded content); a line that is not
    JSON is an error naming the file and line."""
    rows, numbers = [], []
    lines = utf8_lines(path) if text is None else enumerate(text.split("\n"), 1)
    for number, line in lines:
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DepthcutError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        numbers.append(number)
    return rows, numbers
