"""Removing decoder layers so that the model still generates, saves and reloads correctly."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

from torch import nn

from depthcut.errors import DepthcutError
from depthcut.model.layer_fields import ConfigRewrite, rewrite_layer_fields
from depthcut.model.layer_kinds import verify_cut
from depthcut.model.layers import LayerStack, find_layer_stack, text_config


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


def cut_config(model: nn.Module, config, kept: list[int], layer_path: str | None = None,
               allow_unknown_config: Iterable[str] = (), carries_trailing: bool = False,
               trust_remote_code: bool = False) -> tuple[object, ConfigRewrite]:
    """(the config of `model` with only layers `kept`, what changed in it), checked: the rewritten
    config rebuilds every kept layer as the same kind of layer and every other tensor in the same
    shape (`depthcut.model.layer_kinds.verify_cut`), else `DepthcutError` says why. `model` may be
    weightless; `config` is not changed."""
    new_config = copy.deepcopy(config)
    num_layers = len(find_layer_stack(model, layer_path))
    rewrite = rewrite_layer_fields(text_config(new_config), kept, num_layers, allow_unknown_config, carries_trailing)
    verify_cut(model, new_config, kept, layer_path, trust_remote_code)
    return new_config, rewrite


def remove_layers(model: nn.Module, layers: Iterable[int], layer_path: str | None = None,
                  allow_unknown_config: Iterable[str] = ()) -> ConfigRewrite:
    """`prune`, returning what changed in the config."""
    stack: LayerStack = find_layer_stack(model, layer_path)
    num_layers = len(stack)
    removed = validate_layers(layers, num_layers)
    kept = [i for i in range(num_layers) if i not in set(removed)]
    # Checked on a copy first: a refused cut leaves the model as it was.
    cut_config(model, model.config, kept, layer_path, allow_unknown_config)

    new_layers = nn.ModuleList([stack.layers[i] for i in kept])
    for new_index, layer in enumerate(new_layers):
        _renumber(layer, new_index)
    setattr(stack.parent, stack.attr, new_layers)
    # In place: the layers and the model hold references to this config object.
    return rewrite_layer_fields(text_config(model), kept, num_layers, allow_unknown_config)


def prune(model: nn.Module, layers: Iterable[int], layer_path: str | None = None,
          allow_unknown_config: Iterable[str] = ()) -> nn.Module:
    """Remove the decoder layers with the given 0-based indices from `model`, in place.

    Rebuilds the layer list, renumbers every `layer_idx` (the KV cache is indexed by it) and rewrites
    the config (`depthcut.model.layer_fields`: per-layer lists sliced, index lists renumbered, leading
    counts recounted, the layer count set). The cut is refused (`DepthcutError`, the model left as
    it was) where the rewritten config would not rebuild every kept layer as the same kind of layer,
    or has a field that might name layers and that depthcut does not know (`allow_unknown_config`
    names fields known to be harmless). Returns the same model.
    """
    rewrite = remove_layers(model, layers, layer_path, allow_unknown_config)
    for note in rewrite.notes:
        warnings.warn(note, stacklevel=2)
    return model
