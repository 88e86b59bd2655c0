"""A safetensors file's header, read and checked without torch (the checks before loading run
before torch is imported): every tensor's bytes inside the file, apart from every other tensor's,
and as many as its dtype and shape need. `depthcut.io.safetensors` reads and writes the tensors."""

from __future__ import annotations

import functools
import itertools
import json
import math
import struct
from pathlib import Path

from depthcut.errors import DepthcutError

# bytes per element of the safetensors dtypes depthcut reads (those `safetensors.torch` maps)
ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
              "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
              "C64": 8}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


def safetensors_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets; `__metadata__`) and where
    its data begins. Read once per version of the file: a file rewritten in place is read again."""
    path = Path(path)
    stat = path.stat()
    return _read_header(path, stat.st_mtime_ns, stat.st_size)


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor of the safetensors file `path` with its shape, from the header alone."""
    header, _ = safetensors_header(path)
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


@functools.lru_cache(maxsize=256)
def _read_header(path: Path, mtime_ns: int, size: int) -> tuple[dict, int]:
    with path.open("rb") as handle:
        start = handle.read(8)
        if len(start) < 8:
            raise _corrupt(path, f"{size} bytes, too short for a header")
        length = struct.unpack("<Q", start)[0]
        if length > size - 8 or length > _MAX_HEADER:
            raise _corrupt(path, "the header length is beyond the end of the file")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, ValueError):
            raise _corrupt(path, "the header is not valid JSON") from None
    _check_offsets(path, header, size - 8 - length)
    return header, 8 + length


def _check_offsets(path: Path, header, data_size: int) -> None:
    """Every tensor's bytes must lie inside the file, apart from every other tensor's, and (for a
    dtype torch has) be as many as its shape needs: a truncated file fails here, not mid-copy."""
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            shape = entry["shape"]
            valid = (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end
                     and isinstance(entry["dtype"], str) and isinstance(shape, list)
                     and all(isinstance(n, int) and n >= 0 for n in shape))
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise _corrupt(path, f"the entry of tensor {name!r} is malformed")
        if end > data_size:
            raise _corrupt(path, f"tensor {name!r} ends {end - data_size:,} bytes past the end of the file (truncated?)")
        item_size = ITEM_SIZES.get(entry["dtype"])
        if item_size is not None and end - start != math.prod(shape) * item_size:
            raise _corrupt(path, f"tensor {name!r} has {end - start:,} bytes, its shape {shape} of "
                                 f"{entry['dtype']} needs {math.prod(shape) * item_size:,}")
        spans.append((start, end, name))
    spans.sort()
    for (_, end, name), (start, _, other) in itertools.pairwise(spans):
        if start < end:
            raise _corrupt(path, f"the bytes of tensors {name!r} and {other!r} overlap")


def _corrupt(path: Path, why: str) -> DepthcutError:
    return DepthcutError(f"{path} is not a valid safetensors file: {why}")
