"""What kind each decoder layer is, and the check that a cut keeps every kept layer's kind.

A layer's *signature* is its structure as built: the class of every submodule, the shape of every
parameter and buffer, and every plain setting a submodule keeps (`sliding_window`, `is_sliding`,
`use_rope`, ...), its position excluded. Two layers with the same signature compute the same
function of the same weights. After a cut the config must rebuild, at position j, a layer of the
same signature as the kept layer that moves there, and every tensor outside the layers must keep
its shape: `verify_cut` builds the rewritten config's model without weights and checks both, so a
config rule that is wrong or missing is caught before anything is written.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from depthcut.errors import DepthcutError
from depthcut.model.layers import find_layer_stack, text_config
from depthcut.model.skeleton import skeleton_of

# Attributes that hold the layer's own position (renumbered by surgery), not its kind.
_POSITION = re.compile(r"layer_?(idx|id|index|number|num)$|^idx$|^layer$|^layer_id_")
_IGNORED = frozenset({"training", "inplace"})
_PLAIN = (bool, int, float, str, type(None))


def layer_signature(layer: nn.Module) -> tuple:
    """The structure of one layer: submodule classes, tensor shapes and plain settings."""
    parts = []
    for name, module in layer.named_modules():
        parts.append(("module", name, type(module).__name__))
        for key, value in sorted(vars(module).items()):
            if key.startswith("_") or key in _IGNORED or _POSITION.search(key):
                continue
            if isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)):
                parts.append(("setting", name, key, repr(value)))
    for name, tensor in [*layer.named_parameters(remove_duplicate=False), *layer.named_buffers(remove_duplicate=False)]:
        parts.append(("tensor", name, tuple(tensor.shape)))
    return tuple(parts)


def _difference(before: tuple, after: tuple) -> str:
    """The first way two signatures differ, in words."""
    for old, new in zip(before, after):
        if old != new:
            return f"{_describe(old)} becomes {_describe(new)}"
    longer, word = (before, "loses") if len(before) > len(after) else (after, "gains")
    return f"it {word} {_describe(longer[min(len(before), len(after))])}"


def _describe(part: tuple) -> str:
    kind, name, *rest = part
    where = name or "the layer"
    if kind == "module":
        return f"{where} ({rest[0]})"
    if kind == "setting":
        return f"{where}.{rest[0]} = {rest[1]}"
    return f"{where} of shape {list(rest[0])}"


def _outside_tensors(model: nn.Module, stack_path: str) -> dict[str, tuple]:
    prefix = stack_path + "."
    return {name: tuple(t.shape) for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
            if not name.startswith(prefix)}


def rebuilt_config(config):
    """The config as `from_pretrained` will read it back after saving (its class re-validates it and
    may derive fields, such as a layer count from a per-layer pattern)."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return type(config).from_dict(copy.deepcopy(config.to_dict()))
        except Exception as error:  # noqa: BLE001 (any failure to rebuild means the cut is not safe)
            raise DepthcutError(f"the rewritten config does not load back: {type(error).__name__}: "
                                f"{str(error).splitlines()[0] if str(error) else ''}") from None


def weightless_model(config, trust_remote_code: bool = False) -> nn.Module:
    """The model a config builds, parameters on the meta device."""

    try:
        return skeleton_of(config, dtype=torch.float32, trust_remote_code=trust_remote_code).model
    except DepthcutError:
        raise
    except Exception as error:  # noqa: BLE001 (a config that builds no model is refused, with the reason)
        raise DepthcutError(f"the rewritten config does not build a model: {type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''}") from None


def verify_cut(before: nn.Module, config_after, kept: Sequence[int], layer_path: str | None = None,
               trust_remote_code: bool = False) -> None:
    """Refuse (DepthcutError) unless the model `config_after` builds has the kept layers of `before`
    (a model with weights or without), in order, each of the same kind, and the same tensors outside
    the layers."""
    old_stack = find_layer_stack(before, layer_path)
    signatures = [layer_signature(layer) for layer in old_stack.layers]
    _check_mixers_kept(old_stack, kept)
    after = weightless_model(rebuilt_config(config_after), trust_remote_code)
    try:
        new_stack = find_layer_stack(after, old_stack.path)
    except DepthcutError:
        raise DepthcutError("the rewritten config builds a model without the layer stack "
                            f"{old_stack.path!r}; depthcut cannot remove layers from it exactly") from None
    if len(new_stack) != len(kept):
        raise DepthcutError(f"the rewritten config builds {len(new_stack)} layers, not the {len(kept)} kept: a field "
                            "that sets the layer count was not rewritten; depthcut cannot remove layers from it exactly")
    for new_index, old_index in enumerate(kept):
        rebuilt = layer_signature(new_stack.layers[new_index])
        if rebuilt != signatures[old_index]:
            raise DepthcutError(
                f"layer {old_index} would be rebuilt at position {new_index} as another kind of layer "
                f"({_difference(signatures[old_index], rebuilt)}){_allowed_hint(signatures, len(old_stack) - len(kept))}")
    old_outside, new_outside = _outside_tensors(before, old_stack.path), _outside_tensors(after, old_stack.path)
    changed = sorted(name for name in old_outside.keys() | new_outside.keys()
                     if old_outside.get(name) != new_outside.get(name))
    if changed:
        name = changed[0]
        raise DepthcutError(f"the tensor {name} outside the layers changes shape with the layer count "
                            f"({old_outside.get(name)} -> {new_outside.get(name)}): it holds state of every layer, "
                            "which depthcut cannot cut exactly")


def _check_mixers_kept(stack, kept: Sequence[int]) -> None:
    """A hybrid model keeps at least one layer of each mixer (attention, SSM, ...): its cache is laid
    out for every kind it was built with, and transformers' hybrid caches fail without one."""
    mixers = [layer_kind(layer).split("+")[0] for layer in stack.layers]
    lost = sorted(set(mixers) - {mixers[i] for i in kept})
    if len(set(mixers)) > 1 and lost:
        raise DepthcutError(f"the cut removes every {lost[0]} layer of this hybrid model "
                            f"(layers {[i for i, m in enumerate(mixers) if m == lost[0]]}); keep at least one")


def kind_preserving_blocks(signatures: Sequence[tuple], size: int) -> list[tuple[int, int]]:
    """Blocks [l, l+size) (final layer kept) after whose removal every kept layer has, at its new
    position, the signature the original model has there: the cuts allowed when layer kinds follow
    from positions (a period) rather than from a per-layer list."""
    count = len(signatures)
    allowed = []
    for first in range(0, count - size):
        kept = [i for i in range(count) if not first <= i < first + size]
        if all(signatures[old] == signatures[new] for new, old in enumerate(kept)):
            allowed.append((first, first + size))
    return allowed


def _allowed_hint(signatures: Sequence[tuple], size: int) -> str:
    blocks = kind_preserving_blocks(signatures, size) if size > 0 else []
    if not blocks:
        return ""
    shown = ", ".join(f"{a}:{b}" for a, b in blocks[:6]) + (" ..." if len(blocks) > 6 else "")
    return f"; blocks of {size} that keep every layer's kind here: {shown}"


_KIND_WORDS = (
    ("mamba", "ssm"), ("ssm", "ssm"), ("mixer", "ssm"), ("deltanet", "linear-attn"), ("lineara", "linear-attn"),
    ("linear_attn", "linear-attn"), ("shortconv", "conv"), ("conv", "conv"), ("rwkv", "rnn"), ("lstm", "rnn"),
    ("recurrent", "rnn"), ("crossattention", "cross-attn"), ("attention", "attn"), ("attn", "attn"),
)


def layer_kind(layer: nn.Module, config_type: str | None = None) -> str:
    """A short human label for one layer: its mixer (attn, ssm, linear-attn, conv, rnn), its
    feed-forward (moe or mlp), and its attention type where the config names one."""
    mixers, moe = [], False
    for name, module in layer.named_modules():
        cls = type(module).__name__.lower()
        leaf = name.rsplit(".", 1)[-1].lower()
        if "expert" in cls or "moe" in cls or "sparse" in cls or leaf == "experts":
            moe = True
        for word, label in _KIND_WORDS:
            if word in cls and label not in mixers and not cls.endswith(("rotaryembedding", "norm")):
                mixers.append(label)
                break
    mixer = next((m for m in ("ssm", "linear-attn", "conv", "rnn", "attn") if m in mixers), "other")
    if config_type and mixer == "attn" and "attention" in config_type and config_type != "full_attention":
        mixer = config_type.replace("_attention", "").replace("attention", "attn") + "-attn"
    return f"{mixer}+{'moe' if moe else 'mlp'}"


def layer_kinds(model: nn.Module, layer_path: str | None = None) -> list[str]:
    """The label of every decoder layer (`layer_kind`), using the config's `layer_types` where it has one."""

    stack = find_layer_stack(model, layer_path)
    types = getattr(text_config(model), "layer_types", None)
    if not isinstance(types, (list, tuple)) or len(types) != len(stack):
        types = [None] * len(stack)
    return [layer_kind(layer, str(kind) if kind is not None else None) for layer, kind in zip(stack.layers, types)]
