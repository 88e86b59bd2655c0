"""Removing decoder layers so that the model still generates, saves and reloads correctly."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

from depthcut.errors import DepthcutError
from depthcut.model.layer_fields import ConfigRewrite, rewrite_layer_fields
from depthcut.model.layer_kinds import verify_cut
from depthcut.model.layer_spec import parse_layer_spec, validate_layers  # noqa: F401 (re-exported)
from depthcut.model.layers import LayerStack, find_layer_stack, text_config


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


@contextmanager
def layers_removed(model: nn.Module, layers: Iterable[int], layer_path: str | None = None,
                   allow_unknown_config: Iterable[str] = ()) -> Iterator[ConfigRewrite]:
    """`model` less `layers` inside the block, exactly as `remove_layers` cuts it, and whole again after:
    the kept layers are the model's own (no weight is copied), and on leaving, the layer list, every
    layer's index and the text config come back as they were. What a trial cut of a 70B model costs is
    a list and a config, not a second model. A refused cut raises before anything changes."""
    stack = find_layer_stack(model, layer_path)
    layer_list = getattr(stack.parent, stack.attr)
    config = text_config(model)
    config_fields = copy.deepcopy(config.__dict__)
    indices = [(sub, name, getattr(sub, name)) for layer in stack.layers for sub in layer.modules()
               for name in ("layer_idx", "layer_index") if hasattr(sub, name)]
    rewrite = remove_layers(model, layers, layer_path, allow_unknown_config)
    try:
        yield rewrite
    finally:
        setattr(stack.parent, stack.attr, layer_list)
        for sub, name, value in indices:
            setattr(sub, name, value)
        # in place: the layers hold references to this config object
        config.__dict__.clear()
        config.__dict__.update(config_fields)


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
