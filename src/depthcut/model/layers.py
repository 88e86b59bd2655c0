"""Finding the decoder layer stack of any Hugging Face causal LM.

The stack is the one `nn.ModuleList` under the decoder whose length is the text config's
`num_hidden_layers` and whose children are of the classes the model lists in `_no_split_modules`
(`model.layers`, `transformer.h`, `gpt_neox.layers`, `model.decoder.layers`,
`model.language_model.layers`, ...). When that is ambiguous the caller names the path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from depthcut.errors import DepthcutError


@dataclass
class LayerStack:
    """Where the decoder layers live: `getattr(parent, attr)` is the `ModuleList`."""

    path: str
    parent: nn.Module
    attr: str

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.parent, self.attr)

    def __len__(self) -> int:
        return len(self.layers)


def text_config(model_or_config):
    """The config that holds the decoder's layer count (the text config of a multimodal model), of a
    model or of a config."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True)
    return config


def num_decoder_layers(model: nn.Module) -> int | None:
    return getattr(text_config(model), "num_hidden_layers", None)


def _module_lists(root: nn.Module, prefix: str = "") -> list[tuple[str, nn.ModuleList]]:
    found = []
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            found.append((f"{prefix}.{name}" if prefix and name else (prefix or name), module))
    return found


def _stack_at(model: nn.Module, path: str) -> LayerStack:
    parent_path, _, attr = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
        layers = getattr(parent, attr)
    except (AttributeError, KeyError):
        raise DepthcutError(
            f"no module at layer path {path!r}. Module lists in this model: {_describe(model)}"
        ) from None
    if not isinstance(layers, nn.ModuleList):
        raise DepthcutError(f"{path!r} is a {type(layers).__name__}, not an nn.ModuleList of layers")
    return LayerStack(path=path, parent=parent, attr=attr)


def _describe(model: nn.Module) -> str:
    lists = _module_lists(model)
    if not lists:
        return "none"
    return ", ".join(f"{name} ({len(ml)} x {type(ml[0]).__name__})" for name, ml in lists)


def find_layer_stack(model: nn.Module, path: str | None = None) -> LayerStack:
    """Locate the decoder layers; `path` (e.g. ``"model.layers"``) overrides the search."""
    if path:
        return _stack_at(model, path)

    expected = num_decoder_layers(model)
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])

    decoder_path = ""
    if hasattr(model, "get_decoder"):
        try:
            decoder = model.get_decoder()
        except (AttributeError, NotImplementedError, TypeError):
            decoder = None
        if decoder is not None and decoder is not model:
            decoder_path = next((n for n, m in model.named_modules() if m is decoder), "")

    def matches(ml: nn.ModuleList) -> bool:
        if expected is not None and len(ml) != expected:
            return False
        if layer_classes and not all(type(child).__name__ in layer_classes for child in ml):
            return False
        return True

    all_lists = _module_lists(model)
    candidates = [(name, ml) for name, ml in all_lists if matches(ml)]
    # The decoder sub-module, when the model names one, disambiguates (a vision tower also has layers).
    if len(candidates) > 1 and decoder_path:
        under_decoder = [(n, ml) for n, ml in candidates if n.startswith(decoder_path + ".")]
        if under_decoder:
            candidates = under_decoder
    if len(candidates) == 1:
        return _stack_at(model, candidates[0][0])

    what = "several" if candidates else "no"
    expectation = f"{expected} layers" if expected is not None else "an unknown layer count"
    raise DepthcutError(
        f"found {what} decoder layer stacks (looking for a ModuleList of {expectation}"
        f"{' of ' + ', '.join(sorted(layer_classes)) if layer_classes else ''}). "
        f"Candidates: {_describe(model)}. Name the right one with --layer-path (API: layer_path=)."
    )


def first_tensor(args: tuple, kwargs: dict, name: str = "hidden_states") -> torch.Tensor:
    """The hidden state a decoder layer was called with (positional or keyword)."""
    if name in kwargs and isinstance(kwargs[name], torch.Tensor):
        return kwargs[name]
    for value in args:
        if isinstance(value, torch.Tensor):
            return value
    raise RuntimeError("could not find the hidden state among a decoder layer's inputs")


def replace_first_tensor(args: tuple, kwargs: dict, value: torch.Tensor, name: str = "hidden_states"
                         ) -> tuple[tuple, dict]:
    """A decoder layer's (args, kwargs) with the hidden state `first_tensor` finds replaced by `value`
    (what a forward pre-hook returns to feed the layer another stream)."""
    if name in kwargs and isinstance(kwargs[name], torch.Tensor):
        return args, {**kwargs, name: value}
    for position, item in enumerate(args):
        if isinstance(item, torch.Tensor):
            return (*args[:position], value, *args[position + 1 :]), kwargs
    raise RuntimeError("could not find the hidden state among a decoder layer's inputs")


def output_tensor(output) -> torch.Tensor:
    """The hidden state a decoder layer returned (a tensor, or the first item of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "__getitem__"):
        return output[0]
    raise RuntimeError(f"could not find the hidden state in a decoder layer's output ({type(output)})")
