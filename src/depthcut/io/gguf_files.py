"""A GGUF model opened for reading: one file or every part of a split (`NAME-00001-of-00003.gguf`),
its metadata and its tensors, parsed by gguf's memory-mapped `GGUFReader` and checked up front.

Only the headers are parsed; tensor bytes are never touched through the memory map (a mapped page
that was read stays in the resident set while the file is open). They are copied file to file
(`copy_bytes`) or read with plain reads (`read_bytes`), one tensor at a time.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from depthcut.errors import DepthcutError
from depthcut.io.finite import check_finite_bytes
from depthcut.io.gguf_checks import check_header_bounds, check_layers, check_sizes, check_tensor_layout
from depthcut.io.model_files import plain_file_name

SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
_COPY_CHUNK = 16 * 2**20  # bytes per read/write when the kernel cannot copy between the files itself


def gguf_module():
    """The `gguf` package, or a message saying how to install it."""
    try:
        # deferred: the optional gguf package
        import gguf
    except ImportError:
        raise DepthcutError("reading GGUF files needs the gguf package: pip install 'depthcut[gguf]'") from None
    return gguf


def is_gguf_file(path: str | Path) -> bool:
    """Whether `path` names a GGUF file (by its extension; the content is checked when opened)."""
    path = Path(path)
    return path.suffix.lower() == ".gguf" and path.is_file()


@dataclass
class Tensor:
    """One tensor of a GGUF model: where its bytes are and what they hold."""

    name: str
    path: Path  # the file (part) holding it
    offset: int  # absolute position of its first byte in `path`
    nbytes: int
    qtype: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # in numpy order (the GGUF dims reversed), elements not bytes
    info: object = field(repr=False, default=None)  # the reader's ReaderTensor


@dataclass
class GGUFModel:
    """The metadata (`fields`: key -> gguf ReaderField, in file order, from the first part) and the
    tensors (in file order, over all parts) of a GGUF model."""

    path: Path  # the file given (for a split: the first part)
    parts: list[Path]
    fields: dict
    tensors: list[Tensor]
    alignment: int
    endianess: object  # gguf.GGUFEndian
    readers: list = field(repr=False, default_factory=list)

    @property
    def architecture(self) -> str:
        return self.value("general.architecture")

    def value(self, key: str, default=None):
        """The value of metadata `key` (a list for arrays), or `default`."""
        found = self.fields.get(key)
        return default if found is None else found.contents()

    def is_array(self, key: str) -> bool:
        gguf = gguf_module()
        found = self.fields.get(key)
        return found is not None and bool(found.types) and found.types[0] == gguf.GGUFValueType.ARRAY

    @property
    def block_count(self) -> int:
        key = f"{self.architecture}.block_count"
        count = self.value(key)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise DepthcutError(f"{self.path} has no usable {key} (found {count!r}): not a GGUF of a decoder model")
        return count

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def drop_metadata(self) -> None:
        """Free the parsed metadata but the architecture (a large vocabulary's strings take about
        half a KiB each as the reader holds them), for a caller that needs only the tensors."""
        keep = {"general.architecture"}
        self.fields = {key: value for key, value in self.fields.items() if key in keep}
        for reader in self.readers:
            reader.fields.clear()


def split_parts(path: Path) -> list[Path]:
    """The files of the model `path`: itself, or every part of the split it belongs to."""
    match = SPLIT_NAME.match(path.name)
    if match is None:
        return [path]
    count = int(match["count"])
    names = [plain_file_name(f"{match['stem']}-{index:05d}-of-{count:05d}.gguf", path) for index in range(1, count + 1)]
    parts = [path.with_name(name) for name in names]
    missing = [p.name for p in parts if not p.is_file()]  # is_file: a FIFO is missing, not waited on
    if missing:
        raise DepthcutError(f"{path} is part of a GGUF split into {count} files; missing: {', '.join(missing)}")
    return parts


def open_gguf(path: str | Path) -> GGUFModel:
    """Parse the GGUF model at `path` (any part of a split names the whole model); a truncated or
    corrupt file is a `DepthcutError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DepthcutError(f"GGUF file {path} does not exist")
    parts = split_parts(path)
    for part in parts:  # before gguf's reader, which trusts every count it reads
        check_header_bounds(part)
    readers = [_read(part) for part in parts]
    fields = {name: value for name, value in readers[0].fields.items() if not name.startswith("GGUF.")}
    _check_split(parts, readers)
    tensors, seen = [], set()
    for part, reader in zip(parts, readers, strict=True):
        size = part.stat().st_size
        for info in reader.tensors:
            if info.name in seen:
                raise DepthcutError(f"{part}: tensor {info.name!r} appears twice in the model")
            seen.add(info.name)
            end = info.data_offset + info.n_bytes
            if end > size:
                raise _corrupt(part, f"tensor {info.name!r} ends {end - size:,} bytes past the end of the file "
                                     "(truncated?)")
            shape = tuple(int(n) for n in reversed(info.shape.tolist()))
            tensors.append(Tensor(info.name, part, int(info.data_offset), int(info.n_bytes), info.tensor_type,
                                  shape, info))
        check_tensor_layout(part, [t for t in tensors if t.path == part], int(reader.alignment),
                            int(reader.data_offset))
    if "general.architecture" not in fields:
        raise _corrupt(parts[0], "it has no general.architecture")
    model = GGUFModel(parts[0], parts, fields, tensors, int(readers[0].alignment), readers[0].endianess, readers)
    architecture = model.architecture
    check_layers(model.path, architecture, model.value(f"{architecture}.block_count"), [t.name for t in tensors])
    check_sizes(model.path, architecture, model.value, tensors)
    return model


def _read(path: Path):
    try:
        return gguf_module().GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, MemoryError) as error:
        why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, IndexError | OverflowError | MemoryError | TypeError):
            why = f"its header ends early or holds impossible sizes ({why}); the file is truncated or corrupt"
        raise _corrupt(path, why) from None


def _check_split(parts: list[Path], readers: list) -> None:
    if len(parts) == 1:
        count = readers[0].fields.get("split.count")
        if count is not None and count.contents() not in (0, 1):
            raise DepthcutError(f"{parts[0]} is part {readers[0].fields['split.no'].contents() + 1} of a GGUF split "
                                f"into {count.contents()} files, but its name does not say which: rename the parts "
                                "NAME-00001-of-0000N.gguf or merge them (llama-gguf-split --merge)")
        return
    for index, (part, reader) in enumerate(zip(parts, readers, strict=True)):
        number, count = reader.fields.get("split.no"), reader.fields.get("split.count")
        if number is None or count is None or number.contents() != index or count.contents() != len(parts):
            raise DepthcutError(f"{part} does not say it is part {index + 1} of {len(parts)} (split.no / split.count)")


def _corrupt(path: Path, why: str) -> DepthcutError:
    return DepthcutError(f"{path} is not a valid GGUF file: {why}")


# --- tensor bytes -----------------------------------------------------------------------------

def copy_bytes(source: Path, offset: int, length: int, target: int, target_offset: int,
               checked: str | None = None, name: str = "") -> None:
    """Copy `length` bytes at `offset` of the file `source` to the open file descriptor `target` at
    `target_offset`, inside the kernel where it can (no bytes pass through this process). `checked`
    (a float format of `depthcut.io.finite`): the bytes pass through, in whole elements, and the
    tensor `name` is refused if a value is NaN or infinite."""
    with open(source, "rb", buffering=0) as handle:
        done = 0
        try:
            while done < length and checked is None:
                count = os.copy_file_range(handle.fileno(), target, length - done, offset + done, target_offset + done)
                if count == 0:
                    raise DepthcutError(f"{source} ended early while copying its tensors (truncated?)")
                done += count
            if done == length:
                return
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP,
                                   errno.EBADF, errno.EPERM):
                raise
        except AttributeError:  # no os.copy_file_range on this system
            pass
        while done < length:
            chunk = _read_fully(handle.fileno(), min(_COPY_CHUNK, length - done), offset + done)
            if len(chunk) < min(_COPY_CHUNK, length - done):
                raise DepthcutError(f"{source} ended early while copying its tensors (truncated?)")
            if checked is not None:
                check_finite_bytes(chunk, checked, f"tensor {name!r} of {source}")
            written = 0
            while written < len(chunk):
                written += os.pwrite(target, chunk[written:], target_offset + done + written)
            done += len(chunk)


def _read_fully(descriptor: int, length: int, offset: int) -> bytes:
    """`length` bytes at `offset` (fewer only at the end of the file): a chunk of whole elements."""
    parts, got = [], 0
    while got < length:
        part = os.pread(descriptor, length - got, offset + got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def read_bytes(tensor: Tensor) -> np.ndarray:
    """The stored bytes of `tensor` as the reader presents them (a float or int array of the tensor's
    shape for plain types, uint8 rows for quantized ones), read into memory of their own."""
    data = np.empty(tensor.nbytes, dtype=np.uint8)
    view = memoryview(data)
    with open(tensor.path, "rb", buffering=0) as handle:
        done = 0
        while done < tensor.nbytes:
            count = os.preadv(handle.fileno(), [view[done:]], tensor.offset + done)
            if count == 0:
                raise DepthcutError(f"{tensor.path} ended early while reading tensor {tensor.name} (truncated?)")
            done += count
    stored = tensor.info.data  # the reader's view: its dtype, byte order and shape say how to read the bytes
    return data.view(stored.dtype).reshape(stored.shape)
