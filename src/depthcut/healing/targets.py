"""Which linear layers LoRA adapts, found from the model's structure rather than a table of names.

Inside each decoder layer, a linear layer (nn.Linear, or GPT-2's Conv1D) that lives in a child
module whose class is an attention class (LlamaAttention, GPT2Attention, FalconAttention, ...)
is an attention projection; every other one belongs to the MLP (gate/up/down_proj, c_fc/c_proj,
fc1/fc2, dense_h_to_4h/dense_4h_to_h, ...).
"""

from __future__ import annotations

from torch import nn

from depthcut.errors import DepthcutError
from depthcut.model.layers import find_layer_stack

TARGET_KINDS = ("mlp", "attn", "all-linear")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _is_attention(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "attention" in name or name.endswith("attn")


def _classify(layer: nn.Module) -> dict[str, str]:
    """Relative name of each linear leaf in a layer -> "attn" or "mlp"."""
    kinds = {}
    attention_prefixes = [name + "." for name, child in layer.named_modules() if name and _is_attention(child)]
    for name, module in layer.named_modules():
        if name and _is_linear(module):
            kinds[name] = "attn" if any(name.startswith(p) for p in attention_prefixes) else "mlp"
    return kinds


def find_targets(model: nn.Module, targets: str = "mlp", layer_path: str | None = None) -> list[str]:
    """Full module names of the linear layers to adapt.

    `targets` is ``mlp`` (the paper's choice), ``attn``, ``all-linear``, or comma-separated names
    matched against the end of a layer-relative module name (``gate_proj,down_proj``).
    """
    stack = find_layer_stack(model, layer_path)
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    if not wanted:
        raise DepthcutError("--targets is empty")
    chosen, available = [], set()
    for index, layer in enumerate(stack.layers):
        for name, kind in _classify(layer).items():
            available.add(f"{name} ({kind})")
            if targets in TARGET_KINDS:
                keep = targets == "all-linear" or kind == targets
            else:
                keep = any(name == w or name.endswith("." + w) for w in wanted)
            if keep:
                chosen.append(f"{stack.path}.{index}.{name}")
    if not chosen:
        raise DepthcutError(
            f"--targets {targets!r} matches no linear layer in the decoder layers. "
            f"Linear layers of a layer: {', '.join(sorted(available)) or 'none'}; "
            f"use mlp, attn, all-linear or some of these names"
        )
    return chosen
