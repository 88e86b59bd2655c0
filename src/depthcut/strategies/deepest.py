"""The paper's simple baseline: the N layers just before the last one."""

from depthcut.strategies import register_strategy


@register_strategy("deepest", needs_analysis=False, description="the N layers just before the final layer")
def choose(drop, num_layers, analysis, seed):
    return list(range(num_layers - 1 - drop, num_layers - 1))
