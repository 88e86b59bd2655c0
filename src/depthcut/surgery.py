"""Removing decoder layers so that the model still generates, saves and reloads correctly."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch import nn

from depthcut.errors import DepthcutError
from depthcut.layers import LayerStack, find_layer_stack, text_config

# Config fields that hold one entry per layer; they are sliced like the layer list.
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers", "sliding_window_pattern_list", "swa_layers")
# Config fields that hold a list of layer indices; they are renumbered onto the kept layers.
LAYER_INDEX_LIST_FIELDS = ("mlp_only_layers", "global_attn_layers", "full_attention_layers")
# Config fields whose scalar value is a layer index or a layer count threshold: cannot be fixed
# by slicing, so the user is told to check them.
LAYER_INDEX_SCALAR_FIELDS = (
    "max_window_layers",
    "first_k_dense_replace",
    "num_kv_shared_layers",
    "moe_layer_freq",
    "decoder_sparse_step",
    "full_attn_idxs",
)


def parse_layer_spec(spec: str, num_layers: int) -> list[int]:
    """Parse ``"21:29"`` (half-open) or ``"3,7,12"`` (or a mix) into sorted 0-based indices."""
    indices: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise DepthcutError(f"malformed --layers {spec!r}: empty item")
        try:
            if ":" in part:
                start_text, _, stop_text = part.partition(":")
                start, stop = int(start_text), int(stop_text)
                if stop <= start:
                    raise DepthcutError(
                        f"malformed --layers item {part!r}: a block start:stop is half-open and needs stop > start"
                    )
                indices.extend(range(start, stop))
            else:
                indices.append(int(part))
        except ValueError:
            raise DepthcutError(
                f"malformed --layers {spec!r}: use 0-based indices like '3,7,12' or a half-open block like '21:29'"
            ) from None
    return validate_layers(indices, num_layers)


def validate_layers(layers: Iterable[int], num_layers: int) -> list[int]:
    layers = list(layers)
    if not layers:
        raise DepthcutError("no layers to remove")
    duplicates = sorted({i for i in layers if layers.count(i) > 1})
    if duplicates:
        raise DepthcutError(f"layers listed more than once: {duplicates}")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise DepthcutError(
            f"layer indices {bad} are out of range: this model has {num_layers} layers, numbered 0..{num_layers - 1}"
        )
    if len(layers) >= num_layers:
        raise DepthcutError(f"cannot remove all {num_layers} layers; at least one must stay")
    return sorted(layers)


def _renumber(module: nn.Module, new_index: int) -> None:
    for sub in module.modules():
        if hasattr(sub, "layer_idx"):
            sub.layer_idx = new_index
        # Some layers keep their position under another name (Gemma3n, Falcon-H1 variants).
        if hasattr(sub, "layer_index") and isinstance(sub.layer_index, int):
            sub.layer_index = new_index


def update_config(cfg, kept: list[int], num_layers: int) -> list[str]:
    """Slice per-layer fields of a (text) config, renumber index lists and set the layer count;
    returns warnings for fields that cannot be fixed."""
    position = {old: new for new, old in enumerate(kept)}
    notes = []
    for field in vars(cfg).copy():
        value = getattr(cfg, field)
        if field in PER_LAYER_FIELDS and isinstance(value, (list, tuple)):
            if len(value) != num_layers:
                notes.append(f"config field {field!r} has {len(value)} entries for {num_layers} layers; left as is")
                continue
            setattr(cfg, field, type(value)(value[i] for i in kept))
        elif field in LAYER_INDEX_LIST_FIELDS and isinstance(value, (list, tuple)):
            setattr(cfg, field, type(value)(position[i] for i in value if i in position))
        elif field in LAYER_INDEX_SCALAR_FIELDS and value is not None:
            notes.append(
                f"config field {field!r} = {value!r} refers to layer positions; check that it still means "
                f"what you want with layers {sorted(set(range(num_layers)) - set(kept))} removed"
            )
    cfg.num_hidden_layers = len(kept)  # GPT-2's attribute_map maps this to n_layer.
    return notes


def prune(model: nn.Module, layers: Iterable[int], layer_path: str | None = None) -> nn.Module:
    """Remove the decoder layers with the given 0-based indices from `model`, in place.

    Rebuilds the layer list, renumbers every `layer_idx` (the KV cache is indexed by it), updates
    the layer count, slices per-layer config lists such as `layer_types`, and warns about config
    fields that hold layer positions it cannot fix. Returns the same model.
    """
    stack: LayerStack = find_layer_stack(model, layer_path)
    num_layers = len(stack)
    removed = validate_layers(layers, num_layers)
    kept = [i for i in range(num_layers) if i not in set(removed)]

    new_layers = nn.ModuleList([stack.layers[i] for i in kept])
    for new_index, layer in enumerate(new_layers):
        _renumber(layer, new_index)
    setattr(stack.parent, stack.attr, new_layers)

    for note in update_config(text_config(model), kept, num_layers):
        warnings.warn(note, stacklevel=2)
    return model
