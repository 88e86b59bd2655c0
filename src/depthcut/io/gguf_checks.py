"""A GGUF file checked as strictly as a safetensors folder, before anything trusts it.

`check_header_bounds` walks the metadata with plain reads before gguf's reader sees the file: every
count and length must fit in the bytes left (a metadata array that claims 2^62 items in a 5 MB file
made the reader loop, its memory growing, instead of failing). `check_tensor_layout` then checks what
the reader parsed: each tensor's bytes start on `general.alignment` inside the data section and
overlap no other (a shifted offset was copied, re-aligned and so laundered into a valid-looking
output), and the decoder layers are whole: `<arch>.block_count` equal to the layers that have
tensors, and no layer missing a tensor kind that a layer of its own kind has (a dropped
`blk.3.ffn_down.weight` was pruned with exit 0). Hybrid models keep layers of different kinds (an
attention layer's tensors are no subset of a convolution layer's), so only a layer whose kinds are
strictly fewer than another's is refused.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from itertools import islice, pairwise
from pathlib import Path
from typing import BinaryIO

from depthcut.errors import DepthcutError

MAGIC = b"GGUF"
STRING, ARRAY = 8, 9
# struct formats of GGUF's scalar value types (little-endian, as versions 2 and 3 store them)
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                  12: "<d"}
# the fewest bytes one metadata entry and one tensor description take (a key's length and type; a
# name's length, the dimension count, a dimension, the type and the offset)
MIN_ENTRY, MIN_TENSOR = 8 + 4 + 1, 8 + 4 + 8 + 4 + 8
BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def _invalid(path: Path, why: str) -> DepthcutError:
    return DepthcutError(f"{path} is not a valid GGUF file: {why}")


class _Reader:
    """Plain reads through a GGUF header, every count bounded by the bytes left in the file: a skip
    is a seek, so a header of any size costs a few reads, not the header in memory."""

    def __init__(self, path: Path, file: BinaryIO):
        self.path, self.file = path, file
        self.size = os.fstat(file.fileno()).st_size

    def left(self) -> int:
        return self.size - self.file.tell()

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        data = self.file.read(size)
        if len(data) != size:
            raise _invalid(self.path, f"its metadata ends early, at byte {self.file.tell():,}")
        return struct.unpack(fmt, data)[0]

    def count(self, what: str, each: int) -> int:
        """A u64 count of items of at least `each` bytes, bounded by the bytes left."""
        count = self.take("<Q")
        if count * each > self.left():
            raise _invalid(self.path, f"{what} claims {count:,} items of at least {each} bytes, but only "
                                      f"{self.left():,} bytes are left in the file")
        return count

    def skip(self, length: int) -> None:
        self.file.seek(length, os.SEEK_CUR)

    def string(self, what: str) -> str:
        return self.file.read(self.count(what, 1)).decode("utf-8", errors="replace")

    def scalar(self, kind: int):
        """A scalar value of GGUF type `kind` (an integer, float or bool)."""
        return self.take(SCALAR_FORMATS[kind])

    def value(self, kind: int, key: str) -> None:
        """Skip the value of `key` (of GGUF type `kind`), checking every length in it."""
        if kind in SCALAR_FORMATS:
            self.skip(struct.calcsize(SCALAR_FORMATS[kind]))
        elif kind == STRING:
            self.skip(self.count(f"the string of {key}", 1))
        elif kind == ARRAY:
            item = self.take("<I")
            if item in SCALAR_FORMATS:
                size = struct.calcsize(SCALAR_FORMATS[item])
                self.skip(self.count(f"the array {key}", size) * size)
            elif item in (STRING, ARRAY):
                for _ in range(self.count(f"the array {key}", 8 if item == STRING else 12)):
                    self.value(item, key)
            else:
                raise _invalid(self.path, f"the array {key} holds items of unknown type {item}")
        else:
            raise _invalid(self.path, f"{key} has unknown value type {kind}")


def header(path: Path, file: BinaryIO) -> tuple[_Reader, int, int] | None:
    """(a reader at the first metadata entry, the tensor count, the entry count) of the GGUF `file`,
    both counts bounded by the file; None for a version other than 2 or 3 (or a big-endian file):
    gguf's reader says what it makes of those."""
    reader = _Reader(path, file)
    if file.read(4) != MAGIC:
        raise _invalid(path, "it does not start with GGUF")
    if reader.take("<I") not in (2, 3):
        return None
    return reader, reader.count("the tensor count", MIN_TENSOR), reader.count("the metadata count", MIN_ENTRY)


def metadata(reader: _Reader, entries: int) -> Iterator[tuple[str, int]]:
    """(key, value type) of each metadata entry, its value next: the caller may read it (`scalar`,
    `string`); a value left unread is skipped, every length in it checked."""
    for _ in range(entries):
        key = reader.string("a metadata key")
        kind = reader.take("<I")
        before = reader.file.tell()
        yield key, kind
        if reader.file.tell() == before:
            reader.value(kind, key)


def check_header_bounds(path: str | Path) -> None:
    """Walk the GGUF header of `path` (magic, version, counts, every metadata entry, every tensor
    description), refusing any count or length larger than the bytes left, and any tensor that
    starts past the end of the file, with seeks over the values (a vocabulary's strings are never
    held in memory)."""
    path = Path(path)
    with open(path, "rb") as file:
        opened = header(path, file)
        if opened is None:
            return
        reader, tensors, entries = opened
        alignment = 32  # GGUF's default, unless general.alignment says otherwise
        for key, kind in metadata(reader, entries):
            if key == "general.alignment" and kind in SCALAR_FORMATS:
                alignment = reader.scalar(kind)
        starts = []
        for _ in range(tensors):
            name = reader.string("a tensor name")
            dims = reader.take("<I")
            if dims > 8:
                raise _invalid(path, f"a tensor claims {dims} dimensions")
            reader.skip(8 * dims + 4)
            starts.append((reader.take("<Q"), name))
        if reader.left() < 0:
            raise _invalid(path, "its tensor descriptions end past the end of the file")
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1:
            raise _invalid(path, f"general.alignment is {alignment!r}, not a positive whole number")
        data = reader.size - (-(-reader.file.tell() // alignment) * alignment)  # the data section's bytes
        for start, name in starts:
            if start > data:  # (one that starts inside and ends past the end is found once its size is known)
                raise _invalid(path, f"tensor {name!r} starts {start:,} bytes into the data section, which holds "
                                     f"{max(data, 0):,}: its offset is corrupt or the file is truncated")


def check_tensor_layout(part: Path, tensors: list, alignment: int, data_start: int) -> None:
    """The tensors of one file: each starts on `alignment` within the data section (from
    `data_start`) and overlaps no other."""
    placed = sorted(tensors, key=lambda t: t.offset)
    for tensor in placed:
        if tensor.offset < data_start or (tensor.offset - data_start) % alignment:
            raise _invalid(part, f"tensor {tensor.name!r} starts at byte {tensor.offset:,}, not on the file's "
                                 f"{alignment}-byte alignment inside its data section (from byte {data_start:,}): "
                                 "its offset is corrupt")
    for first, second in pairwise(placed):
        if first.offset + first.nbytes > second.offset:
            raise _invalid(part, f"tensors {first.name!r} and {second.name!r} overlap")


def check_layers(path: Path, architecture: str, block_count, tensor_names: list[str]) -> None:
    """`<arch>.block_count` equal to the layers that have tensors (blk.0 .. blk.N-1, none missing),
    and no layer missing a tensor kind that another layer of its kind has."""
    kinds: dict[int, set[str]] = {}
    for name in tensor_names:
        if match := BLOCK.match(name):
            kinds.setdefault(int(match[1]), set()).add(match[2])
    if not kinds or not isinstance(block_count, int) or isinstance(block_count, bool):
        return  # not a decoder's layers (or no count): the layer surgery says what it makes of it
    beyond = sorted(i for i in kinds if i >= block_count)
    if beyond:
        raise DepthcutError(f"{path} has tensors of layers {beyond} but {architecture}.block_count is "
                            f"{block_count}: its layers are not understood")
    if len(kinds) < block_count:  # the first few missing (a count of 2^32 must not be walked)
        missing = list(islice((i for i in range(block_count) if i not in kinds), 9))
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        raise _invalid(path, f"{architecture}.block_count is {block_count:,} but layer(s) {shown} have no tensors "
                             f"({len(kinds)} layers have): the file is incomplete or its count is wrong")
    for index, found in sorted(kinds.items()):
        fuller = next((other for other, theirs in sorted(kinds.items()) if found < theirs), None)
        if fuller is not None:
            absent = sorted(kinds[fuller] - found)
            raise _invalid(path, f"layer {index} lacks {', '.join(f'blk.{index}.{k}' for k in absent[:4])}, "
                                 f"which layer {fuller} of the same kind has: a tensor is missing")


def check_sizes(path: Path, architecture: str, value, tensors: list) -> None:
    """`<arch>.embedding_length` (and `<arch>.vocab_size`, where given) equal to the embedding's
    shape (`token_embd.weight`, (vocabulary, width) in torch order): a model is built from the
    metadata, and a width the tensors do not have would be built (a 2^40 one, allocated) before the
    load found that the weights do not fit it. `value(key)` reads the metadata."""
    embedding = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if embedding is None or len(embedding.shape) != 2:
        return
    for key, size in ((f"{architecture}.embedding_length", embedding.shape[1]),
                      (f"{architecture}.vocab_size", embedding.shape[0])):
        declared = value(key)
        if isinstance(declared, int) and not isinstance(declared, bool) and declared != size:
            raise _invalid(path, f"{key} is {declared:,} but token_embd.weight is {list(embedding.shape)} "
                                 "(vocabulary, width): the metadata does not describe the tensors")
