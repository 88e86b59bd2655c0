"""Depth pruning of a GGUF model: the plan for removing layers (`depthcut.model.gguf_layers`), what
it will change (`planned_facts`), and the file written with depthcut's provenance in its
`depthcut.*` metadata keys (`depthcut.io.gguf_writer`). See docs/gguf.md."""

from __future__ import annotations

import json
import time
from collections import Counter
from math import prod

import numpy as np

from depthcut.errors import DepthcutError
from depthcut.io.gguf_files import GGUFModel, gguf_module, open_gguf
from depthcut.io.gguf_writer import write_gguf_file
from depthcut.model.gguf_layers import LayerPlan, plan_removal
from depthcut.model.surgery import validate_layers

PROVENANCE_KEYS = {
    "removed": "depthcut.removed_layers",  # in the numbering of the original model (across repeated prunes)
    "original_layers": "depthcut.original_block_count",
    "original_file": "depthcut.original_file",
    "provenance": "depthcut.provenance",  # this prune's provenance, as JSON
}


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


def gguf_plan(source_path, removed_layers, global_keys=()) -> tuple[GGUFModel, LayerPlan]:
    """The opened GGUF model at `source_path` and the plan for removing `removed_layers` (0-based; may
    be empty: a rewrite), or the `DepthcutError` that says what stands in the way."""
    model = open_gguf(source_path)
    removed = validate_layers(removed_layers, model.block_count) if list(removed_layers) else []
    return model, plan_removal(model, removed, global_keys)


def planned_facts(model: GGUFModel, plan: LayerPlan, replaced: dict) -> dict:
    """What writing `plan` changes, known before a byte is written: tensors, bytes and parameters
    before and after, the tensor types written (most common first), the metadata changed (in the
    shape of a config rewrite: key -> before and after), the tensors `replaced` in F32."""
    kept = [t for t in model.tensors if plan.rename(t.name) is not None]
    types = Counter("F32" if t.name in replaced else t.qtype.name for t in kept)
    arch = model.architecture
    changed = {f"{arch}.block_count": {"before": plan.num_layers, "after": len(plan.kept)}}
    for key in plan.sliced:
        before = model.value(key)
        changed[key] = {"before": before, "after": [before[i] for i in plan.kept]}
    changed.update({key: {"before": old, "after": new} for key, (old, new) in plan.recounted.items()})
    return {
        "source": str(model.path),
        "source_parts": len(model.parts),
        "architecture": arch,
        "tensors_before": len(model.tensors),
        "tensors_after": len(kept),
        "tensor_bytes_before": model.tensor_bytes,
        "tensor_bytes_after": sum(t.nbytes for t in kept),
        "file_bytes_before": sum(part.stat().st_size for part in model.parts),
        "parameters_before": sum(prod(t.shape) for t in model.tensors),
        "parameters_after": sum(prod(t.shape) for t in kept),
        "quantization": dict(types.most_common()),
        "replaced_tensors": {plan.rename(name): {"was": next(t.qtype.name for t in model.tensors if t.name == name),
                                                 "now": "F32"} for name in sorted(replaced) if plan.rename(name)},
        "config_rewrite": {"changed": changed, "allowed_unknown": [],
                           "notes": [f"{key} not written (the output is one file)" for key in plan.dropped]},
    }


def write_gguf(model: GGUFModel, plan: LayerPlan, out_path, provenance: dict, replaced: dict | None = None,
               force: bool = False) -> int:
    """Write `plan` to `out_path` with `provenance` in `depthcut.provenance`; `replaced` (GGUF tensor
    name -> tensor of its shape) in F32 instead of the originals. Returns the bytes written."""
    values = replacement_values(model, replaced or {})
    return write_gguf_file(model, plan, out_path, _provenance_values(model, plan, provenance), values, force)


def prune_gguf(source_path, out_path, removed_layers, *, provenance: dict | None = None, force: bool = False,
               global_keys=(), replaced: dict | None = None) -> dict:
    """Write to `out_path` the GGUF model `source_path` without the decoder layers `removed_layers`
    (0-based; may be empty: a rewrite), and return a summary of what changed.

    Kept tensors are copied byte for byte in their own quantization, `blk.N.*` renumbered; the
    block count and every per-layer metadata array follow (see `depthcut.model.gguf_layers` for which, and
    for what stops a prune). A split model (`*-00001-of-0000N.gguf`) is read whole and written as one
    file. `provenance` (JSON-serializable) is stored in `depthcut.provenance`. The output appears
    only when complete (`depthcut.io.atomic`); with `force` it replaces an existing `out_path`.
    `global_keys`: metadata arrays known not to describe layers (others of unexpected length stop it).
    `replaced` (GGUF tensor name -> tensor of its shape, e.g. a repair folded in) is written in F32 in
    place of those tensors; the summary's `replaced_tensors` names them.
    """

    started = time.perf_counter()
    model, plan = gguf_plan(source_path, removed_layers, global_keys)
    record = {"source_file": str(model.path), "removed_layers": plan.removed, **(provenance or {})}
    facts = planned_facts(model, plan, replaced or {})
    written = write_gguf(model, plan, out_path, record, replaced, force)
    rewrite = facts.pop("config_rewrite")
    return {
        **facts,
        "out": str(out_path),
        "num_layers_before": plan.num_layers,
        "num_layers_after": len(plan.kept),
        "removed_layers": plan.removed,
        "sliced_keys": plan.sliced,
        "recounted_keys": {key: list(change) for key, change in plan.recounted.items()},
        "dropped_keys": plan.dropped,
        "config_rewrite": rewrite,
        "file_bytes_after": written,
        "seconds": round(time.perf_counter() - started, 3),
    }


def replacement_values(model: GGUFModel, replaced: dict) -> dict[str, np.ndarray]:
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


def gguf_block_count(path) -> int:
    """The decoder layer count of the GGUF model at `path` (from its metadata; no tensor is read)."""
    return open_gguf(path).block_count
