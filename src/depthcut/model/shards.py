"""Pruning a safetensors checkpoint shard by shard, without ever building the model.

The layer stack's name comes from a skeleton of the model on the meta device (no weights).
Each output shard is written by copying one tensor at a time into a safetensors file whose
header is computed up front (`depthcut.io.safetensors`), so peak memory is one tensor, not one
shard or one model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, rename_source_key

from depthcut.errors import DepthcutError
from depthcut.io.model_files import copy_extra_files, model_file, plain_file_name, read_model_text
from depthcut.io.safetensors import copied_entry, safetensors_header, tensor_entry, write_safetensors
from depthcut.model.layer_fields import TRAILING_LAYERS
from depthcut.model.layers import find_layer_stack, text_config
from depthcut.model.skeleton import meta_skeleton
from depthcut.model.surgery import cut_config, validate_layers

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def shard_map(folder: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index (or the single file)."""
    if (folder / INDEX_FILE).exists():
        try:
            weight_map = json.loads(read_model_text(folder, INDEX_FILE)).get("weight_map")
        except (ValueError, AttributeError):  # UnicodeDecodeError is a ValueError
            weight_map = None
        if not isinstance(weight_map, dict):
            raise DepthcutError(f"{folder / INDEX_FILE} is not a valid safetensors index (no weight_map)")
        for shard in set(weight_map.values()):
            plain_file_name(shard, folder / INDEX_FILE)
        missing = sorted({f for f in weight_map.values() if not (folder / f).exists()})
        if missing:
            raise DepthcutError(f"{folder / INDEX_FILE} names shards that are missing: {', '.join(missing)}")
        for shard in set(weight_map.values()):
            model_file(folder, shard)
        return weight_map
    if (folder / SINGLE_FILE).exists():
        header, _ = safetensors_header(model_file(folder, SINGLE_FILE))
        return {name: SINGLE_FILE for name in header if name != "__metadata__"}
    raise DepthcutError(f"{folder} holds no {SINGLE_FILE} or {INDEX_FILE}")


def model_names(checkpoint_names, model) -> tuple[dict[str, str], set[str]]:
    """(checkpoint tensor name -> the model's parameter name, as `from_pretrained` maps them;
    the checkpoint names transformers converts on load).

    Checkpoints are not always saved under the model's own names: a base model's weights lack the
    head class's prefix, and transformers renames some architectures' keys on load (Gemma 3's
    `language_model.model.*` is `model.language_model.*` in the model). Keys that transformers
    fuses or splits on load (a `WeightConverter`, e.g. per-expert weights) are in the second set,
    named after the first tensor they become: they cannot be loaded one tensor at a time.
    """
    meta_state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    names, converted = {}, set()
    for key in checkpoint_names:
        name, pattern = rename_source_key(key, renamings, converters, prefix or None, meta_state)
        if pattern is not None:
            converted.add(key)
        names[key] = name
    return names, converted


def _renamed(key: str, name: str, pattern: re.Pattern, position: dict[int, int], num_layers: int) -> str | None:
    """The checkpoint tensor `key`'s new name (`name` is the model's name for it), or None if it
    belongs to a removed layer. The layer index is changed where the checkpoint key has it (after the
    stack's own name: `layers.5.` in `model.layers.5.mlp.experts.0.up_proj.weight`, which the model
    may call by a fused name). Layers stored after the stack (multi-token prediction,
    `model.layers.{num_layers}`) move down with it."""
    match = pattern.match(name)
    if not match:
        return key
    old_index = int(match.group(2))
    new_index = position.get(old_index) if old_index < num_layers else len(position) + old_index - num_layers
    if new_index is None:
        return None
    stack_name = match.group(1).rstrip(".").rsplit(".", 1)[-1]  # "layers", "h", ...
    in_key = re.compile(rf"(^|\.){re.escape(stack_name)}\.{old_index}(\.)")
    found = in_key.search(key)
    if found is None:
        raise DepthcutError(f"cannot renumber the checkpoint tensor {key!r} (the model calls it {name!r})")
    return f"{key[: found.start(2) - len(str(old_index))]}{new_index}{key[found.start(2):]}"


def check_tensor_shapes(folder: Path, weight_map: dict[str, str], names: dict[str, str], converted: set[str],
                        model) -> None:
    """Every stored tensor that the model built from config.json loads as it is must have the shape
    the model gives it: a config whose hidden_size (or intermediate_size, head count, ...) the weights
    do not have would be written out beside them, a model that cannot be loaded. Read from the
    headers; the refusal names config.json and the fields whose sizes the weights lack. A quantized
    checkpoint's tensors have its quantizer's shapes (packed 4-bit rows): not compared."""
    if getattr(model.config, "quantization_config", None):
        return
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    for key, shard in sorted(weight_map.items()):
        want = expected.get(names.get(key, key))
        if want is None or key in converted:
            continue
        header, _ = safetensors_header(folder / shard)
        stored = tuple(header[key]["shape"]) if key in header else want
        if stored != want:
            raise DepthcutError(f"{folder / 'config.json'} does not describe these weights: {key} is "
                                f"{list(stored)} in {shard}, but the config makes it {list(want)}"
                                f"{_fields_sized(text_config(model.config), set(want) - set(stored))}")


def _fields_sized(config, sizes: set[int]) -> str:
    """" (hidden_size is 128)": the config's fields whose values are the sizes given, for a message."""
    fields = [f"{key} is {value}" for key, value in sorted(config.to_dict().items())
              if isinstance(value, int) and not isinstance(value, bool) and value in sizes]
    return f" ({', '.join(fields[:3])})" if fields else ""


def trailing_layers(config) -> int:
    """How many layers the config says are stored after the stack (multi-token prediction)."""

    counts = [getattr(text_config(config), name, 0) for name in TRAILING_LAYERS]
    return sum(c for c in counts if isinstance(c, int) and not isinstance(c, bool) and c > 0)


def check_layer_count(names, pattern: re.Pattern, num_layers: int, folder: Path, trailing: int = 0) -> None:
    """The checkpoint's layers (`pattern` matches a layer tensor's model name, its second group the
    index) must be the config's: a config that says more or fewer layers would write a broken model.
    `trailing` layers after the stack (multi-token prediction) may be stored or not."""
    found = {int(match.group(2)) for name in names if (match := pattern.match(name))}
    if found not in (set(range(num_layers)), set(range(num_layers + trailing))):
        raise DepthcutError(f"{folder}: config.json says {num_layers} layers, but the weights hold "
                            f"{len(found)} (layers {min(found, default=0)} to {max(found, default=-1)}); the config "
                            "does not describe these weights")


def prune_shards(source: str | Path, out: Path, layers: list[int], layer_path: str | None = None,
                 replaced: dict | None = None, allow_unknown_config=(), trust_remote_code: bool = False) -> dict:
    """Write into the folder `out` the checkpoint of `source` without `layers`; returns a summary.
    `replaced` (checkpoint tensor name -> tensor, of the same shape) is written in place of those
    tensors (a repair folded in, `depthcut.repair.streamed`); every other tensor is copied byte for byte."""

    source = Path(source)
    skeleton = meta_skeleton(source)
    stack = find_layer_stack(skeleton.model, layer_path)
    path, num_layers = stack.path, len(stack)
    removed = validate_layers(layers, num_layers)
    kept = [i for i in range(num_layers) if i not in set(removed)]
    position = {old: new for new, old in enumerate(kept)}
    pattern = re.compile(rf"^({re.escape(path)}\.)(\d+)(\..*)$")
    weight_map = shard_map(source)
    names, converted = model_names(weight_map, skeleton.model)
    check_layer_count(names.values(), pattern, num_layers, source, trailing_layers(skeleton.config))
    check_tensor_shapes(source, weight_map, names, converted, skeleton.model)
    # Layers stored after the stack (multi-token prediction) are carried when the checkpoint has them.
    trailing = any(int(m.group(2)) >= num_layers for m in map(pattern.match, names.values()) if m)
    # Decided before any shard is written: a cut the config cannot describe is refused here.
    new_config, rewrite = cut_config(skeleton.model, skeleton.config, kept, layer_path, allow_unknown_config,
                                     carries_trailing=trailing, trust_remote_code=trust_remote_code)
    replaced = replaced or {}
    unknown = sorted(set(replaced) - set(weight_map))
    if unknown:
        raise DepthcutError(f"the checkpoint in {source} has no tensor {unknown[0]!r} to replace")
    by_shard: dict[str, list] = {}  # shard file -> the entries (renamed tensors) it keeps
    for name, shard in sorted(weight_map.items()):
        new_name = _renamed(name, names.get(name, name), pattern, position, num_layers)
        if new_name is None:
            continue
        entry = copied_entry(new_name, source / shard, name)
        if name in replaced:
            if tuple(replaced[name].shape) != entry.shape:
                raise DepthcutError(f"the new {name} has shape {tuple(replaced[name].shape)}, not {entry.shape}")
            entry = tensor_entry(new_name, replaced[name])
        by_shard.setdefault(shard, []).append(entry)

    new_map, total = {}, 0
    for shard, entries in sorted(by_shard.items()):
        total += write_safetensors(out / shard, entries, finite=True)  # a NaN kept is refused, not copied
        new_map.update({entry.name: shard for entry in entries})
    if (source / INDEX_FILE).is_file():
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": new_map}, indent=2))

    new_config.save_pretrained(out)
    # tokenizer, generation config, chat template, ...
    copy_extra_files(source, out, skip={INDEX_FILE, "config.json"}, skip_suffixes=(".safetensors",))
    return {"removed_layers": removed, "num_layers_before": num_layers, "num_layers_after": len(kept),
            "layer_path": path, "tensor_bytes": total, "config_rewrite": rewrite.as_dict(), "replaced_tensors": sorted(replaced)}
