"""safetensors files read and written one tensor at a time, never a whole file in memory.

- `safetensors_header`: a file's header, read once per version of the file, with every tensor's bytes
  checked to lie inside the file and not to overlap another's (a truncated or corrupt file fails
  before anything is read or copied).
- `read_tensor`: one tensor, by plain file reads rather than a memory map: mapped pages of a file
  stay in the process's resident set while it is open, which would bring a whole checkpoint back
  into memory layer by layer.
- `write_safetensors`: a file written a tensor at a time behind a header computed up front, each
  tensor copied from a byte range of another file or taken from a tensor in memory.
- `DTYPES` / `dtype_name`: safetensors dtype strings <-> torch dtypes (those `safetensors.torch` maps).

Like `safetensors.torch`, this assumes a little-endian host (the format's byte order).
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from depthcut.errors import DepthcutError
from depthcut.io.finite import check_finite_bytes, check_finite_tensors
from depthcut.io.safetensors_header import safetensors_header

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2": torch.float8_e5m2, "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "C64": torch.complex64,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_COPY_CHUNK = 16 * 2**20  # bytes copied from a source file at a time


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ("BF16" for torch.bfloat16)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise DepthcutError(f"safetensors cannot store tensors of {dtype}") from None


# --- reading ----------------------------------------------------------------------------------

def read_tensor(path: Path, name: str, pin: bool = False) -> torch.Tensor:
    """The tensor `name` of the safetensors file `path`, read into memory of its own (`own_memory`),
    or page-locked memory with `pin` (for asynchronous copies to a GPU)."""
    path = Path(path)
    header, data_start = safetensors_header(path)
    if name not in header or name == "__metadata__":
        raise DepthcutError(f"{path} holds no tensor {name!r}")
    entry = header[name]
    dtype = DTYPES.get(entry["dtype"])
    if dtype is None:
        raise DepthcutError(f"tensor {name!r} of {path} is of dtype {entry['dtype']}, which depthcut cannot read")
    start, end = entry["data_offsets"]
    if end == start:
        return torch.empty(entry["shape"], dtype=dtype)
    buffer = torch.empty(end - start, dtype=torch.uint8, pin_memory=True) if pin else own_memory(end - start)
    with path.open("rb", buffering=0) as handle:
        handle.seek(data_start + start)
        if _read_into(handle, memoryview(buffer.numpy())) != len(buffer):
            raise DepthcutError(f"{path} is truncated (tensor {name})")
    return buffer.view(dtype).reshape(entry["shape"])


def _read_into(handle, view: memoryview) -> int:
    """Fill `view` from `handle` (one read returns at most about 2 GiB on Linux); returns bytes read."""
    done = 0
    while done < len(view):
        count = handle.readinto(view[done:])
        if not count:
            break
        done += count
    return done


def own_memory(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of `nbytes` in memory mapped for it alone, handed back to
    the system the moment the last tensor using it is freed.

    Weights are read into such memory, not into the heap: a layer's weights freed from the heap
    leave holes between the activations allocated meanwhile, which the next layer's (allocated a
    layer earlier, while this one computes) do not fit, so the resident set would creep up by
    about a layer per layer unless the heap were trimmed, and trimming it also hands back the
    activations' memory, which the next layer then faults back in, page by page.
    """
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)


# --- writing ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileBytes:
    """A tensor's bytes in another file: `length` bytes from the absolute position `offset`."""

    path: Path
    offset: int
    length: int
    key: str = ""  # the tensor's name in that file


@dataclass(frozen=True)
class Entry:
    """One tensor of a file to write: its name, safetensors dtype, shape, and where its bytes come
    from (a byte range of another file, or a tensor in memory)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: FileBytes | torch.Tensor

    @property
    def nbytes(self) -> int:
        if isinstance(self.source, FileBytes):
            return self.source.length
        return self.source.numel() * self.source.element_size()


def tensor_entry(name: str, tensor: torch.Tensor) -> Entry:
    """An entry that writes `tensor` (any device; made contiguous on the CPU as it is written)."""
    return Entry(name, dtype_name(tensor.dtype), tuple(tensor.shape), tensor)


def copied_entry(name: str, path: Path, key: str) -> Entry:
    """An entry that copies the tensor `key` of the safetensors file `path`, byte for byte, as `name`."""
    header, data_start = safetensors_header(path)
    entry = header.get(key) if key != "__metadata__" else None
    if entry is None:
        raise DepthcutError(f"{path} holds no tensor {key!r}, which the shard index says it does")
    start, end = entry["data_offsets"]
    return Entry(name, entry["dtype"], tuple(entry["shape"]), FileBytes(Path(path), data_start + start, end - start, key))


def write_safetensors(path: Path, entries: list[Entry], metadata: dict[str, str] | None = None,
                      finite: bool = False) -> int:
    """Write `entries` into the safetensors file `path`, in their order, one tensor in memory at a
    time (a copied one in chunks); returns the bytes of tensor data. `metadata` is the file's
    `__metadata__` (strings to strings), by default {"format": "pt"}, which transformers expects.
    `finite`: refuse a float tensor holding NaN or an infinity (`depthcut.io.finite`), checked as
    it is copied (the caller writes into a staging folder, removed on the error)."""
    metadata = {"format": "pt"} if metadata is None else metadata
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata maps strings to strings")
    header, offset = {"__metadata__": metadata}, 0
    for entry in entries:
        _check_entry(entry)
        if entry.name in header:
            raise ValueError(f"two tensors are named {entry.name!r}")
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with Path(path).open("wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for entry in entries:
            if isinstance(entry.source, FileBytes):
                _copy_bytes(entry.source, out, entry.dtype if finite else None, entry.name)
            elif entry.nbytes:
                if finite:
                    check_finite_tensors([(entry.name, entry.source)], "the tensors written")
                data = entry.source.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                out.write(memoryview(data.numpy()))
    return offset


def _check_entry(entry: Entry) -> None:
    """The entry's bytes are as many as its dtype and shape need (where depthcut knows the dtype)."""
    if isinstance(entry.source, torch.Tensor):
        if entry.dtype != dtype_name(entry.source.dtype) or tuple(entry.source.shape) != tuple(entry.shape):
            raise ValueError(f"tensor {entry.name!r}: the entry says {entry.dtype} {list(entry.shape)}, the tensor is "
                             f"{entry.source.dtype} {list(entry.source.shape)}")
        return
    dtype = DTYPES.get(entry.dtype)
    if dtype is not None and entry.nbytes != math.prod(entry.shape) * dtype.itemsize:
        raise ValueError(f"tensor {entry.name!r}: {entry.nbytes} bytes, but {entry.dtype} {list(entry.shape)} "
                         f"needs {math.prod(entry.shape) * dtype.itemsize}")


def _copy_bytes(span: FileBytes, out, checked: str | None = None, name: str = "") -> None:
    """Copy `span` to the open file `out` in chunks (whole elements: a buffered read returns all it
    is asked for before the end of the file); `checked`: the dtype whose values must be finite."""
    with span.path.open("rb") as handle:
        handle.seek(span.offset)
        left = span.length
        while left:
            data = handle.read(min(left, _COPY_CHUNK))
            if not data:
                raise DepthcutError(f"{span.path} is truncated")
            if checked is not None:
                check_finite_bytes(data, checked, f"tensor {(span.key or name)!r} of {span.path}")
            out.write(data)
            left -= len(data)
