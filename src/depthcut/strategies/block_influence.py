"""ShortGPT: the N individually least influential layers by Block Influence."""

from depthcut.strategies import register_strategy


@register_strategy("block-influence", needs_analysis=True, description="the N layers of lowest Block Influence (ShortGPT)")
def choose(drop, num_layers, analysis, seed):
    influence = analysis.metric("block_influence")
    return sorted(range(num_layers), key=lambda layer: (influence[layer], layer))[:drop]
