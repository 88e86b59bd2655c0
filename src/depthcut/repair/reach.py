"""Which layers a repair's fold changes: a linear map touches the layer before its block only, a magnitude
scale every writer into the stream before the block (the embeddings and every layer before it). A model
scored from a stored stream may start no later than the first layer the fold changes."""

from __future__ import annotations

from depthcut.model.layers import find_layer_stack
from depthcut.repair import REPAIRS
from depthcut.repair.architectures import architecture_of

EMBEDDINGS = -1  # a fold into a module outside the decoder layers (the token or position embeddings)


def changed_layers(model, fit, layer_path: str | None = None) -> set[int]:
    """The indices of the decoder layers whose weights folding `fit` changes, with `EMBEDDINGS` for any
    module outside the layers."""
    stack = find_layer_stack(model, layer_path)
    owner = {id(module): index for index, layer in enumerate(stack.layers) for module in layer.modules()}
    modules = REPAIRS.get(fit.method).modules(model, stack, architecture_of(model), fit)
    return {owner.get(id(module), EMBEDDINGS) for module in modules}


def first_changed_layer(model, fit, layer_path: str | None = None) -> int:
    """The first decoder layer whose computation folding `fit` changes: 0 where it changes the embeddings."""
    return max(0, min(changed_layers(model, fit, layer_path)))
