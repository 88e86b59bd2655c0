"""A GGUF file written from an opened GGUF model and a `LayerPlan` (`depthcut.model.gguf_layers`):
the chosen layers' tensors left out, the kept ones renumbered and copied byte for byte in their own
quantization, the metadata changed as the plan says.

gguf-py's public `GGUFWriter` API writes the header, the metadata and the tensor infos; the tensor
data is then copied file to file by the kernel (`copy_file_range`), so memory stays flat whatever
the model's size. Metadata the plan does not change is written again with its own types (the same
bytes); the values that change keep their source types.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from depthcut.errors import DepthcutError
from depthcut.io.atomic import atomic_output_file
from depthcut.io.finite import GGUF_FLOATS, REFUSAL
from depthcut.io.gguf_files import GGUFModel, copy_bytes, gguf_module


def _metadata_value(key: str, field):
    """(value, type, array item type) of a reader field, for gguf's `add_key_value`: written again
    with its own types, it packs to the bytes it had."""
    item_type = field.types[-1] if len(field.types) > 1 else None
    try:
        return field.contents(), field.types[0], item_type
    except UnicodeDecodeError:
        raise DepthcutError(f"the GGUF metadata {key!r} holds a string that is not UTF-8 (GGUF strings are); "
                            "the file is corrupt") from None


def _new_value(field, value):
    """(value, type, array item type) for writing `value` with the types of the source `field`."""
    item_type = field.types[-1] if len(field.types) > 1 else None
    return value, field.types[0], item_type


def write_pruned(model: GGUFModel, plan, path: Path, extra: dict | None = None,
                 replaced: dict[str, np.ndarray] | None = None) -> int:
    """Write the GGUF `model` changed as `plan` says to `path`, with the metadata `extra` (key ->
    (value, type, item type)) added or replaced and the tensors `replaced` (name -> float32 array)
    written in F32 instead of copied; returns the bytes written.

    gguf's public `GGUFWriter` writes the header, the metadata and the tensor infos (and lays out the
    aligned data offsets); the tensor data is then appended here, each tensor padded to the alignment
    as those offsets say, kept tensors copied file to file."""
    gguf = gguf_module()
    writer = gguf.GGUFWriter(None, model.architecture, endianess=model.endianess)  # writes general.architecture
    writer.data_alignment = model.alignment
    for key, field in model.fields.items():
        if key in plan.dropped or key in (extra or {}) or key == "general.architecture":
            continue
        value = _new_value(field, plan.values[key]) if key in plan.values else _metadata_value(key, field)
        writer.add_key_value(key, *value)
    for key, value in (extra or {}).items():
        writer.add_key_value(key, *value)

    copies = []
    for tensor in model.tensors:
        name = plan.rename(tensor.name)
        if name is None:
            continue
        new = (replaced or {}).get(tensor.name)
        if new is not None:
            if not np.isfinite(new).all():
                raise DepthcutError(f"the repaired {tensor.name} holds NaN or infinite values: {REFUSAL}")
            writer.add_tensor_info(name, new.shape, new.dtype, new.nbytes)
            copies.append(new)
            continue
        stored = tensor.info.data  # the reader's view (dtype and byte shape), never its bytes
        writer.add_tensor_info(name, stored.shape, stored.dtype, tensor.nbytes, raw_dtype=tensor.qtype)
        copies.append(tensor)
    if not copies:
        raise DepthcutError(f"{model.path}: nothing would be left to write")
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
    finally:
        writer.close()
    with open(path, "r+b") as out:
        out.seek(0, os.SEEK_END)
        for tensor in copies:
            writer.write_padding(out, out.tell())  # the data section and every tensor start aligned
            start = out.tell()
            if isinstance(tensor, np.ndarray):
                out.write(tensor.tobytes())
            else:
                out.flush()
                # a plain float tensor passes through, checked finite; quantized blocks are copied in the kernel
                copy_bytes(tensor.path, tensor.offset, tensor.nbytes, out.fileno(), start,
                           GGUF_FLOATS.get(int(tensor.qtype)), tensor.name)
                out.seek(start + tensor.nbytes)
        writer.write_padding(out, out.tell())
        out.flush()
        return out.tell()


def write_gguf_file(model: GGUFModel, plan, out_path, extra: dict, replaced: dict[str, np.ndarray],
                    force: bool = False) -> int:
    """`write_pruned` to `out_path`, which appears only when complete (`depthcut.io.atomic`); never over
    a part of the model being read. Returns the bytes written."""
    out_path = Path(out_path)
    if out_path.resolve() in {part.resolve() for part in model.parts}:
        raise DepthcutError(f"--out {out_path} is the model being pruned; choose another file")
    with atomic_output_file(out_path, force) as staging:
        return write_pruned(model, plan, staging, extra, replaced)
