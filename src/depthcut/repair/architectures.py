"""Where each supported architecture's residual-stream writers live, and what it cannot repair.

A repair folds a matrix or a factor into the weights that write into the residual stream, so it
must know them by name. Paths are relative to one decoder layer, except `positions`, which is
relative to the module that holds the layer stack (`transformer` for GPT-2, `model.decoder` for OPT).
Architectures not in the table are refused rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from depthcut.errors import DepthcutError
from depthcut.model.layers import LayerStack, text_config


@dataclass(frozen=True)
class Architecture:
    mlp: str  # the module whose output the residual add adds (the hooked m)
    mlp_out: str  # its output projection: nn.Linear, or GPT-2's Conv1D
    attn_out: str  # the attention output projection
    positions: tuple[str, ...] = ()  # learned position embeddings
    post_norm: str | None = None  # a norm between a writer and the residual add (Gemma 2/3)


_LLAMA = Architecture(mlp="mlp", mlp_out="mlp.down_proj", attn_out="self_attn.o_proj")
_GEMMA = Architecture(mlp="mlp", mlp_out="mlp.down_proj", attn_out="self_attn.o_proj",
                      post_norm="post_feedforward_layernorm")
_NEOX = Architecture(mlp="mlp", mlp_out="mlp.dense_4h_to_h", attn_out="attention.dense")

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "phi3": _LLAMA,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gpt2": Architecture(mlp="mlp", mlp_out="mlp.c_proj", attn_out="attn.c_proj", positions=("wpe",)),
    "opt": Architecture(mlp="fc2", mlp_out="fc2", attn_out="self_attn.out_proj", positions=("embed_positions",)),
    "falcon": Architecture(mlp="mlp", mlp_out="mlp.dense_4h_to_h", attn_out="self_attention.dense"),
    "gpt_neox": _NEOX,
}


def architecture_of(model: nn.Module) -> Architecture:
    """The table entry for `model`, refusing architectures that are not in it or are post-norm."""
    config = text_config(model)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise DepthcutError(
            f"repair does not know where the residual-stream writers of {model_type!r} models are "
            f"(supported: {', '.join(sorted(ARCHITECTURES))}); the MLP output projection cannot be found"
        )
    if model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
        raise DepthcutError(
            "this OPT model normalises after the residual add (do_layer_norm_before=False): the stream is not a "
            "sum of layer outputs, so no repair can be folded exactly"
        )
    return ARCHITECTURES[model_type]


def submodule(layer: nn.Module, path: str, what: str, index: int) -> nn.Module:
    try:
        return layer.get_submodule(path)
    except AttributeError:
        raise DepthcutError(
            f"cannot find the {what} {path!r} in layer {index} ({type(layer).__name__}); repair refuses to guess"
        ) from None


def mlp_output_projection(stack: LayerStack, arch: Architecture, index: int) -> nn.Module:
    """Layer `index`'s MLP output projection, checked to be a Linear or a Conv1D of width d -> d_model."""

    module = submodule(stack.layers[index], arch.mlp_out, "MLP output projection", index)
    if not isinstance(module, (nn.Linear, Conv1D)):
        raise DepthcutError(
            f"layer {index}'s MLP output projection {arch.mlp_out!r} is a {type(module).__name__}, "
            "not an nn.Linear or Conv1D: cannot fold a repair into it"
        )
    return module


def refuse_post_norm(stack: LayerStack, arch: Architecture, index: int, method: str) -> None:
    """Lstsq/cosine fold T into the MLP output projection: exact only if the MLP output reaches the add as is."""
    layer = stack.layers[index]
    if arch.post_norm or hasattr(layer, "post_feedforward_layernorm"):
        raise DepthcutError(
            f"{method} repair refused: layer {index} ({type(layer).__name__}) normalises its MLP output "
            "(post_feedforward_layernorm) before the residual add, so folding T into the MLP output "
            "projection would not compute (x - m) + m T"
        )
