"""Pruned GGUF out of a GGUF in: the chosen layers' tensors left out, the kept ones renumbered and
copied byte for byte in their own quantization, the metadata adjusted (`depthcut.gguf.layers`).

The output is written by gguf's `GGUFWriter` (header, metadata, tensor infos); tensor data is copied
file to file by the kernel (`copy_file_range`), so memory stays flat whatever the model's size.
Metadata the prune does not change is copied as the exact bytes it had (its types, its order); the
values that change keep their source types. Provenance goes into `depthcut.*` keys.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from depthcut.errors import DepthcutError
from depthcut.gguf.files import GGUFModel, copy_bytes, gguf_module, open_gguf
from depthcut.gguf.layers import LayerPlan, plan_removal

PROVENANCE_KEYS = {
    "removed": "depthcut.removed_layers",  # in the numbering of the original model (across repeated prunes)
    "original_layers": "depthcut.original_block_count",
    "original_file": "depthcut.original_file",
    "provenance": "depthcut.provenance",  # this prune's provenance, as JSON
}


class _Raw:
    """A metadata value (its type and payload) as the bytes it had in the source file."""

    def __init__(self, data: bytes):
        self.data = data


def _writer_class():
    gguf = gguf_module()

    class Writer(gguf.GGUFWriter):
        """`GGUFWriter` that writes values given as `_Raw` bytes unchanged."""

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if isinstance(val, _Raw):
                return val.data
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def _raw_value(field) -> _Raw:
    """The type and payload of a reader field (the parts after the key's length and bytes), as stored."""
    return _Raw(b"".join(part.tobytes() for part in field.parts[2:]))


def _new_value(field, value):
    """(value, type, array item type) for writing `value` with the types of the source `field`."""
    item_type = field.types[-1] if len(field.types) > 1 else None
    return value, field.types[0], item_type


def _provenance_values(model: GGUFModel, plan: LayerPlan, provenance: dict) -> dict:
    """The depthcut.* keys: removed layers in the original model's numbering (a pruned file pruned
    again keeps counting from the original), the original's layer count and file, this prune's record."""
    gguf = gguf_module()
    previous = model.value(PROVENANCE_KEYS["removed"]) or []
    original_count = model.value(PROVENANCE_KEYS["original_layers"]) or plan.num_layers
    original_kept = [i for i in range(original_count) if i not in set(previous)]
    if len(original_kept) != plan.num_layers:  # inconsistent records: start counting afresh from this file
        previous, original_count, original_kept = [], plan.num_layers, list(range(plan.num_layers))
    removed = sorted(set(previous) | {original_kept[i] for i in plan.removed})
    original_file = model.value(PROVENANCE_KEYS["original_file"]) or model.path.name
    T = gguf.GGUFValueType
    values = {
        PROVENANCE_KEYS["original_layers"]: (original_count, T.UINT32, None),
        PROVENANCE_KEYS["original_file"]: (original_file, T.STRING, None),
        PROVENANCE_KEYS["provenance"]: (json.dumps(provenance, sort_keys=True, default=str), T.STRING, None),
    }
    if removed:  # gguf arrays cannot be empty
        values[PROVENANCE_KEYS["removed"]] = (removed, T.ARRAY, T.UINT32)
    return values


def prune_gguf(source_path, out_path, removed_layers, *, provenance: dict | None = None, force: bool = False,
               global_keys=(), replaced: dict | None = None) -> dict:
    """Write to `out_path` the GGUF model `source_path` without the decoder layers `removed_layers`
    (0-based; may be empty: a rewrite), and return a summary of what changed.

    Kept tensors are copied byte for byte in their own quantization, `blk.N.*` renumbered; the
    block count and every per-layer metadata array follow (see `depthcut.gguf.layers` for which, and
    for what stops a prune). A split model (`*-00001-of-0000N.gguf`) is read whole and written as one
    file. `provenance` (JSON-serializable) is stored in `depthcut.provenance`. The output appears
    only when complete (`depthcut.io.atomic`); with `force` it replaces an existing `out_path`.
    `global_keys`: metadata arrays known not to describe layers (others of unexpected length stop it).
    `replaced` (GGUF tensor name -> tensor of its shape, e.g. a repair folded in) is written in F32 in
    place of those tensors; the summary's `replaced_tensors` names them.
    """
    from depthcut.io.atomic import atomic_output_file
    from depthcut.surgery import validate_layers

    started = time.perf_counter()
    model = open_gguf(source_path)
    removed = validate_layers(removed_layers, model.block_count) if list(removed_layers) else []
    plan = plan_removal(model, removed, global_keys)
    out_path = Path(out_path)
    if out_path.resolve() in {part.resolve() for part in model.parts}:
        raise DepthcutError(f"--out {out_path} is the model being pruned; choose another file")
    record = {"source_file": str(model.path), "removed_layers": removed, **(provenance or {})}
    values = _replacement_values(model, replaced or {})
    with atomic_output_file(out_path, force) as staging:
        written = write_pruned(model, plan, staging, _provenance_values(model, plan, record), values)
    kept = [t for t in model.tensors if plan.rename(t.name) is not None]
    return {
        "source": str(model.path),
        "source_parts": len(model.parts),
        "out": str(out_path),
        "architecture": model.architecture,
        "num_layers_before": plan.num_layers,
        "num_layers_after": len(plan.kept),
        "removed_layers": removed,
        "sliced_keys": plan.sliced,
        "recounted_keys": {key: list(change) for key, change in plan.recounted.items()},
        "dropped_keys": plan.dropped,
        "tensors_before": len(model.tensors),
        "tensors_after": len(kept),
        "tensor_bytes_before": model.tensor_bytes,
        "tensor_bytes_after": sum(t.nbytes for t in kept),
        "file_bytes_before": sum(part.stat().st_size for part in model.parts),
        "file_bytes_after": written,
        "quantization": dict(Counter("F32" if t.name in values else t.qtype.name for t in kept)),
        "replaced_tensors": {plan.rename(name): {"was": next(t.qtype.name for t in model.tensors if t.name == name),
                                                 "now": "F32"} for name in sorted(values) if plan.rename(name)},
        "seconds": round(time.perf_counter() - started, 3),
    }


def _replacement_values(model: GGUFModel, replaced: dict) -> dict[str, np.ndarray]:
    """The `replaced` tensors as float32 arrays in the GGUF's own (numpy) shape, checked against the originals."""
    shapes = {t.name: tuple(t.shape) for t in model.tensors}
    values = {}
    for name, tensor in replaced.items():
        if name not in shapes:
            raise DepthcutError(f"{model.path} has no tensor {name!r} to replace")
        array = tensor.detach().float().cpu().numpy()
        if array.shape != shapes[name]:
            raise DepthcutError(f"the new {name} has shape {array.shape}, not {shapes[name]}")
        values[name] = np.ascontiguousarray(array)
    return values


def write_pruned(model: GGUFModel, plan: LayerPlan, path: Path, extra: dict | None = None,
                 replaced: dict[str, np.ndarray] | None = None) -> int:
    """Write the GGUF `model` changed as `plan` says to `path`, with the metadata `extra` (key ->
    (value, type, item type)) added or replaced and the tensors `replaced` (name -> float32 array)
    written in F32 instead of copied; returns the bytes written."""
    writer = _writer_class()(path, model.architecture, endianess=model.endianess)
    writer.data_alignment = model.alignment
    kv = writer.kv_data[0]
    kv.clear()
    GGUFValue = gguf_module().gguf_writer.GGUFValue
    for key, field in model.fields.items():
        if key in plan.dropped or key in (extra or {}):
            continue
        if key in plan.values:
            kv[key] = GGUFValue(*_new_value(field, plan.values[key]))
        else:
            kv[key] = GGUFValue(_raw_value(field), field.types[0])
    for key, (value, vtype, sub_type) in (extra or {}).items():
        kv[key] = GGUFValue(value, vtype, sub_type)

    copies = []
    for tensor in model.tensors:
        name = plan.rename(tensor.name)
        if name is None:
            continue
        new = (replaced or {}).get(tensor.name)
        if new is not None:
            writer.add_tensor_info(name, new.shape, new.dtype, new.nbytes)
            copies.append(new)
            continue
        stored = tensor.info.data  # the reader's view (dtype and byte shape), never its bytes
        writer.add_tensor_info(name, stored.shape, stored.dtype, tensor.nbytes, raw_dtype=tensor.qtype)
        copies.append(tensor)
    if not copies:
        raise DepthcutError(f"{model.path}: nothing would be left to write")
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        out = writer.fout[0]
        for tensor in copies:
            writer.write_padding(out, out.tell())
            out.flush()
            start = out.tell()
            if isinstance(tensor, np.ndarray):
                out.write(tensor.tobytes())
            else:
                copy_bytes(tensor.path, tensor.offset, tensor.nbytes, out.fileno(), start)
                out.seek(start + tensor.nbytes)
            writer.write_padding(out, tensor.nbytes)
        out.flush()
        return out.tell()
    finally:
        writer.close()


def prune_gguf_to(model: str, out, removed_layers, *, force: bool = False, provenance: dict | None = None,
                  replaced: dict | None = None) -> dict:
    """What `depthcut prune MODEL --out X.gguf` does once the layers are chosen: `prune_gguf` on the
    GGUF file of the MODEL string (a .gguf path or a built-in name), its source recorded."""
    from depthcut.models import resolve_model

    source = resolve_model(model)
    if not source.gguf_file:
        raise DepthcutError(f"{model} is not a GGUF model: --out {out} asks for a .gguf output, which depthcut writes "
                            "only from a GGUF model (prune it to a folder instead)")
    path = Path(source.location) / source.gguf_file
    record = {"base_model": source.as_dict(), **(provenance or {})}
    return prune_gguf(path, out, removed_layers, provenance=record, force=force, replaced=replaced)


def gguf_block_count(path) -> int:
    """The decoder layer count of the GGUF model at `path` (from its metadata; no tensor is read)."""
    return open_gguf(path).block_count
