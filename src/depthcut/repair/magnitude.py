"""Prune&Comp (Chen et al., 2025, arXiv 2507.18212): undo the jump in the stream's norm at the cut.

alpha = (sum over tokens of |x_{l+n}|) / (sum over tokens of |x_l|), the ratio of the mean norms
(not the mean of per-token ratios). Folded into every weight that writes into the residual
stream before the cut -- the token embedding, learned position embeddings, and every layer < l's
attention and MLP output projections, with biases -- so the stream entering layer l+n of the
pruned model is alpha x_l. The layers before the cut are pre-norm: they see alpha x and
normalise it away, so they compute the same thing up to their norm's epsilon.
"""

from __future__ import annotations

from depthcut.errors import DepthcutError
from depthcut.model.layers import text_config
from depthcut.repair.architectures import mlp_output_projection, submodule
from depthcut.repair.fold import scale
from depthcut.repair.methods import RepairFit, RepairMethod, register_repair


def _tied(model) -> bool:
    configs = {id(c): c for c in (model.config, text_config(model))}.values()
    if any(getattr(c, "tie_word_embeddings", False) for c in configs):
        return True
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return output is not None and output.weight is model.get_input_embeddings().weight


def writers(model, stack, arch, first: int) -> list:
    """Every module whose output is added into the residual stream before layer `first`."""
    modules = [model.get_input_embeddings()]
    for name in arch.positions:
        modules.append(submodule(stack.parent, name, "position embedding", -1))
    for index in range(first):
        modules.append(submodule(stack.layers[index], arch.attn_out, "attention output projection", index))
        modules.append(mlp_output_projection(stack, arch, index))
    return modules


@register_repair
class Magnitude(RepairMethod):
    name = "magnitude"

    def check(self, model, stack, arch, first, stop):
        if _tied(model):
            raise DepthcutError(
                "magnitude repair refused: the input and output embeddings are tied, so scaling the token "
                "embedding by alpha would also scale the LM head's logits"
            )
        if arch.post_norm:
            raise DepthcutError(
                "magnitude repair refused: this architecture normalises the attention and MLP outputs before the "
                "residual add (post_attention/post_feedforward_layernorm), so scaling their projections does not "
                "scale the stream"
            )
        writers(model, stack, arch, first)

    def fit(self, statistics) -> RepairFit:
        s = statistics
        alpha = s.y_norm / s.x_norm
        after = (alpha * alpha * s.x_sq - 2 * alpha * s.xy + s.y_sq) / s.y_sq
        return RepairFit(
            method=self.name, first=s.first, stop=s.stop, num_layers=s.num_layers, tokens=s.tokens,
            error_before=s.error_before, error_after=max(after, 0.0), alpha=alpha,
        )

    def modules(self, model, stack, arch, fit):
        return writers(model, stack, arch, fit.first)

    def fold(self, module, fit):
        scale(module, fit.alpha)
