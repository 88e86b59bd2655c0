"""Pruning a safetensors checkpoint shard by shard, without ever building the model.

The layer stack's name comes from a skeleton of the model on the meta device (no weights).
Each output shard is written by streaming one tensor at a time into a safetensors file whose
header is computed up front, so peak memory is one tensor, not one shard or one model.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import struct
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.surgery import update_config, validate_layers

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def shard_map(folder: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index (or the single file)."""
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise DepthcutError(f"{folder / INDEX_FILE} names shards that are missing: {', '.join(missing)}")
        return weight_map
    if (folder / SINGLE_FILE).is_file():
        from safetensors import safe_open

        with safe_open(folder / SINGLE_FILE, "pt") as handle:
            return {name: SINGLE_FILE for name in handle.keys()}
    raise DepthcutError(f"{folder} holds no {SINGLE_FILE} or {INDEX_FILE}")


def layer_prefix(folder: Path, layer_path: str | None = None) -> tuple[str, int, object]:
    """(layer stack path, layer count, config) from a weightless skeleton of the model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from depthcut.layers import find_layer_stack

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    stack = find_layer_stack(skeleton, layer_path)
    return stack.path, len(stack), config


def _renamed(name: str, pattern: re.Pattern, position: dict[int, int]) -> str | None:
    """The tensor's new name, or None if it belongs to a removed layer."""
    match = pattern.match(name)
    if not match:
        return name
    new_index = position.get(int(match.group(2)))
    return None if new_index is None else f"{match.group(1)}{new_index}{match.group(3)}"


@functools.cache
def _header(shard: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, offsets) and where its data begins."""
    with shard.open("rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        return json.loads(handle.read(size)), 8 + size


def _write_streamed(path: Path, tensors: list[tuple[str, str, Path]]) -> int:
    """Write (new name, old name, shard path) tensors into one safetensors file, a tensor at a time."""
    header, offset, spans = {}, 0, []
    for new_name, old_name, shard in tensors:
        entry, data_start = _header(shard)[0][old_name], _header(shard)[1]
        start, end = entry["data_offsets"]
        header[new_name] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + end - start]}
        spans.append((shard, data_start + start, end - start))
        offset += end - start
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for shard, position, size in spans:
            with shard.open("rb") as handle:  # one tensor's bytes in memory at a time
                handle.seek(position)
                data = handle.read(size)
            if len(data) != size:
                raise DepthcutError(f"{shard} is truncated")
            out.write(data)
    return offset


def prune_shards(source: str | Path, out: Path, layers: list[int], layer_path: str | None = None) -> dict:
    """Write into the folder `out` the checkpoint of `source` without `layers`; returns a summary."""
    source = Path(source)
    path, num_layers, config = layer_prefix(source, layer_path)
    removed = validate_layers(layers, num_layers)
    kept = [i for i in range(num_layers) if i not in set(removed)]
    position = {old: new for new, old in enumerate(kept)}
    pattern = re.compile(rf"^(.*?{re.escape(path)}\.)(\d+)(\..*)$")
    weight_map = shard_map(source)
    by_shard: dict[str, list[tuple[str, str, str]]] = {}
    for name, shard in sorted(weight_map.items()):
        new_name = _renamed(name, pattern, position)
        if new_name is not None:
            by_shard.setdefault(shard, []).append((new_name, name, source / shard))

    new_map, total = {}, 0
    for shard, tensors in sorted(by_shard.items()):
        total += _write_streamed(out / shard, tensors)
        new_map.update({new_name: shard for new_name, _, _ in tensors})
    if (source / INDEX_FILE).is_file():
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": new_map}, indent=2))

    _header.cache_clear()
    notes = update_config(config.get_text_config(decoder=True), kept, num_layers)
    config.save_pretrained(out)
    for extra in source.iterdir():  # tokenizer, generation config, chat template, ...
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in (INDEX_FILE, "config.json"):
            shutil.copy2(extra, out / extra.name)
    return {"removed_layers": removed, "num_layers_before": num_layers, "num_layers_after": len(kept),
            "layer_path": path, "tensor_bytes": total, "config_warnings": notes}
